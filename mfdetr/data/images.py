"""Reading image files as 8-bit RGB, whatever their mode (real COCO has grayscale and CMYK images).

- ``L``, ``1``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``LA``, ``RGBA``, ``P`` → PIL's ``convert("RGB")``
  (alpha is dropped, as the official DETR loaders' ``convert("RGB")`` does; palette images with a
  transparency entry go through RGBA first).
- 16-bit / 32-bit integer images (``I;16``, ``I;16B``, ``I;16L``, ``I``) are scaled from the 16-bit
  range to 8 bits (``round(v / 257)``, clipped to ``[0, 65535]``), then replicated to 3 channels;
  float ``F`` images are clipped to ``[0, 255]``.
- A missing, unreadable, corrupt or truncated file, and one whose header declares more than
  :data:`MAX_PIXELS` pixels (refused before decoding), raises :class:`mfdetr.errors.SkipImage` (the
  run records it and goes on).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from mfdetr.errors import SkipImage

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")

#: Largest image (width × height) that is decoded: PIL's default decompression-bomb threshold
#: (89,478,485 ≈ 9459², about 256 MiB as RGB; COCO images have ~0.3 M pixels).
MAX_PIXELS = 89_478_485


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit ``RGB`` (see module doc for the per-mode rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT:
        a = np.asarray(image).astype(np.float64)
        a = np.clip(np.rint(np.clip(a, 0, 65535) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(a[..., None], 3, axis=2), mode="RGB")
    if mode == "F":
        a = np.clip(np.rint(np.nan_to_num(np.asarray(image, dtype=np.float64))), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(a[..., None], 3, axis=2), mode="RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_rgb(path: str | Path, *, max_pixels: int | None = None) -> Image.Image:
    """Open ``path`` fully (decoding every byte) and return it as 8-bit RGB.

    The size is read from the file's header first: an image of more than ``max_pixels`` pixels
    (default :data:`MAX_PIXELS`) is refused before anything is decoded, so memory stays bounded
    whatever the header claims (PIL itself only refuses beyond twice its own threshold).

    Raises:
        SkipImage: the file is missing, not an image, corrupt, truncated or too large.
    """
    path = Path(path)
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    if not path.is_file():
        raise SkipImage(path, "missing image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                w, h = im.size
                if w < 1 or h < 1:
                    raise SkipImage(path, f"image has no pixels ({w}x{h})")
                if w * h > limit:
                    raise SkipImage(
                        path, f"image too large: {w}x{h} = {w * h} pixels, over the limit of {limit} (not decoded)"
                    )
                im.load()  # decode now: a truncated JPEG fails here ("image file is truncated")
                rgb = to_rgb(im)
                return rgb.copy() if rgb is im else rgb  # a closed PIL image loses its pixels
    except Image.DecompressionBombError as e:
        raise SkipImage(path, f"image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise SkipImage(path, f"corrupt or unreadable image ({type(e).__name__}: {e})") from None


def header_problem(
    path: str | Path, *, expect_hw: tuple[int, int] | None = None, max_pixels: int | None = None
) -> str | None:
    """Why ``path`` cannot be used, from its header and PIL's structural check only (nothing decoded),
    or ``None``: missing, not an image, no pixels, over ``max_pixels`` (default :data:`MAX_PIXELS`), or
    not of size ``expect_hw`` (height, width)."""
    path = Path(path)
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    if not path.is_file():
        return "missing image file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                w, h = im.size
                im.verify()
    except Image.DecompressionBombError:
        return "image too large"
    except Exception as e:  # noqa: BLE001 - whatever PIL raises on a damaged file
        return f"corrupt or unreadable image ({type(e).__name__}: {e})"
    if w < 1 or h < 1:
        return f"image has no pixels ({w}x{h})"
    if w * h > limit:
        return f"image too large: {w}x{h} = {w * h} pixels, over the limit of {limit} (not decoded)"
    if expect_hw is not None and (h, w) != tuple(expect_hw):
        return f"image is {w}x{h} but the annotation file says {expect_hw[1]}x{expect_hw[0]}"
    return None
