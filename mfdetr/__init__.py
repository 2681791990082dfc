"""mfdetr: Mask Frozen-DETR as a two-stage pipeline (cache the frozen detector, train the mask network).

Public surface (import from here or from the subpackages' ``__init__``):

- :class:`mfdetr.contracts.DetectorOutput` — what every frozen detector returns and the cache stores.
- :class:`mfdetr.contracts.DetectorPreset` / :class:`mfdetr.contracts.Preprocessing` — preset metadata.
- :class:`mfdetr.errors.MfdetrError` — a user-facing error (one line, non-zero exit in the CLI).
"""

__version__ = "0.1.0"
