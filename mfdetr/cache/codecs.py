"""Feature codec presets of a cache store (``mfdetr cache --codec NAME``).

A preset is a chain of zarr/numcodecs array-to-array *filters* applied to the float16 feature arrays
(codec ``features`` in ``cache_schemas/v1/arrays.json``: ``queries``, the encoder maps and ``c1``)
before the store's data compressor (``manifest.codecs.data``, zstd level 1 by default). Boxes,
logits, sizes and flags are never filtered: they are small and drive assignment and scoring.

========== ======================================= ==========================================
preset     filters (numcodecs' own codecs)         error bound on a stored float16 value x
========== ======================================= ==========================================
lossless   none (today's float16 + zstd-1)         exact
bitround-7 ``BitRound(keepbits=7)``                |x' - x| <= 2^-8 |x| + 2^-22  (relative)
bitround-4 ``BitRound(keepbits=4)``                |x' - x| <= 2^-5 |x| + 2^-19  (relative)
quantize-1 ``Quantize(digits=1)``: step 1/16       |x' - x| <= 2^-5       (absolute)
========== ======================================= ==========================================

BitRound rounds the mantissa to N bits (to nearest, ties to even), so zstd finds the zeroed low bits;
Quantize rounds to a fixed absolute step (2^-4 for one decimal digit), which also zeroes small
values — an 8-bit-like grid with no range to choose, hence no clipping and no wrap-around (numcodecs'
``FixedScaleOffset`` to ``uint8`` would wrap values outside a fixed range silently). A value whose
encoding would overflow float16 (``|x| > max_abs``: 65280 for bitround-7, 63488 for bitround-4, 4094
for quantize-1) stops the run with a one-line error naming the image, like a non-finite detector output.

The manifest records ``codecs.preset`` and ``codecs.feature_filters`` (the zarr metadata of every
filter); the arrays' own metadata carries the same chain, so a reader needs no flag.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.codecs.numcodecs import BitRound, Quantize

from mfdetr.errors import MfdetrError

# numcodecs' filters are zarr-python extensions (outside the Zarr v3 spec): that is by design here
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

DEFAULT_PRESET = "lossless"
#: largest finite float16
F16_MAX = 65504.0


@dataclass(frozen=True)
class CodecPreset:
    """One ``--codec`` choice: its filters, error bound and the largest magnitude it can encode."""

    name: str
    make_filters: Callable[[], tuple[Any, ...]]
    relative_error: float  # bound on |x' - x| / |x| (0: none)
    absolute_error: float  # bound on |x' - x| (0: none)
    max_abs: float  # |x| above this would encode as +-inf
    description: str

    @property
    def lossless(self) -> bool:
        return self.relative_error == 0 and self.absolute_error == 0

    def filters(self) -> tuple[Any, ...]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.make_filters()

    def filter_metadata(self) -> list[dict[str, Any]]:
        """The filters as zarr v3 codec metadata (what the manifest records and validation compares)."""
        return [_jsonable(f.to_dict()) for f in self.filters()]

    def bound(self, x: np.ndarray) -> np.ndarray:
        """Largest allowed ``|x' - x|`` elementwise."""
        return self.relative_error * np.abs(x.astype(np.float64)) + self.absolute_error


def _bitround(keepbits: int) -> CodecPreset:
    return CodecPreset(
        name=f"bitround-{keepbits}",
        make_filters=lambda: (BitRound(keepbits=keepbits),),
        # subnormals (|x| < 2^-14) have a fixed quantum instead: the absolute term
        relative_error=2.0 ** -(keepbits + 1),
        absolute_error=2.0 ** -(keepbits + 15),
        max_abs=(2 - 2.0**-keepbits) * 2.0**15,
        description=f"numcodecs BitRound: {keepbits} of float16's 10 mantissa bits kept, relative error "
        f"<= 2^-{keepbits + 1}",
    )


def _quantize(digits: int) -> CodecPreset:
    step = 2.0 ** -int(np.ceil(np.log2(10.0**digits)))  # numcodecs Quantize's grid for `digits`
    return CodecPreset(
        name=f"quantize-{digits}",
        make_filters=lambda: (Quantize(digits=digits, dtype="<f2"),),
        relative_error=0.0,
        absolute_error=step / 2,
        max_abs=np.floor(F16_MAX * step),
        description=f"numcodecs Quantize: absolute step {step:g}, absolute error <= {step / 2:g}",
    )


PRESETS: dict[str, CodecPreset] = {
    p.name: p
    for p in (
        CodecPreset(
            name="lossless",
            make_filters=tuple,
            relative_error=0.0,
            absolute_error=0.0,
            max_abs=F16_MAX,
            description="float16 + the data compressor (zstd-1): bit-exact",
        ),
        _bitround(7),
        _bitround(4),
        _quantize(1),
    )
}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def get_preset(name: str) -> CodecPreset:
    """The preset called ``name``; :class:`MfdetrError` listing the choices otherwise."""
    if name not in PRESETS:
        raise MfdetrError(f"--codec {name!r} is not a codec preset (choose from {', '.join(PRESETS)})")
    return PRESETS[name]


def manifest_codecs(preset: str, data: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``codecs`` entry for ``preset`` and the data compressor ``data``."""
    return {
        "data": dict(data),
        "commit": {"name": "none"},
        "preset": preset,
        "feature_filters": get_preset(preset).filter_metadata(),
    }


def preset_of(manifest: dict[str, Any]) -> CodecPreset:
    """The preset a manifest records (a manifest written before presets existed is ``lossless``)."""
    return get_preset(manifest["codecs"].get("preset", DEFAULT_PRESET))


def with_codec_defaults(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with ``codecs.preset`` / ``codecs.feature_filters`` filled in as ``lossless`` where a
    manifest written before presets existed lacks them (so such a store can still be resumed)."""
    codecs = manifest.get("codecs")
    if not isinstance(codecs, dict) or "preset" in codecs:
        return manifest
    return {**manifest, "codecs": {**codecs, "preset": DEFAULT_PRESET, "feature_filters": []}}


def feature_filters(manifest: dict[str, Any]) -> tuple[Any, ...]:
    """zarr filter objects of the manifest's feature chain."""
    return preset_of(manifest).filters()


def check_encodable(manifest: dict[str, Any], name: str, value: np.ndarray, where: str) -> None:
    """Raise :class:`MfdetrError` if ``value`` holds a magnitude the preset cannot encode (see module doc)."""
    p = preset_of(manifest)
    if p.max_abs >= F16_MAX or value.size == 0:
        return
    peak = max(float(value.max()), -float(value.min()))  # no |value| temporary (maps can be large)
    if peak > p.max_abs:
        raise MfdetrError(
            f"the detector returned |value| = {peak:g} in '{name}' for {where}, beyond what "
            f"--codec {p.name} can store (|x| <= {p.max_abs:g}); stopping — use --codec lossless "
            "or bitround-7 with another --out"
        )


def filters_metadata_of(arr: Any) -> list[dict[str, Any]]:
    """The zarr v3 metadata of an open array's filters (array-to-array codecs, inside a shard if sharded)."""
    return [_jsonable(f.to_dict()) for f in arr.filters]
