"""``python -m mfdetr`` is the same as the ``mfdetr`` console script."""

from mfdetr.cli import main

if __name__ == "__main__":
    main()
