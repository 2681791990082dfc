"""Stage-1 feature cache: a schema-validated, resumable, shardable Zarr v3 store of detector outputs.

- :func:`run_cache` / :class:`CacheJob` — run a frozen detector over a COCO split into a store
  (``mfdetr cache``); resumable, shardable (``--shard i/n`` or torchrun), background writer.
- :class:`CacheStore` — open + validate a store (``expect=`` manifest values), list complete images,
  ``read(i)`` → one image's :class:`~mfdetr.contracts.DetectorOutput` (batch dim 1).
- :class:`CacheWriter` / :class:`BackgroundWriter` — open / write / commit of single images.
- :func:`build_manifest`, :func:`validate_manifest_data`, :func:`check_expectations` — the manifest.
- :func:`inspect_store` — the report of ``mfdetr inspect``.
- :mod:`mfdetr.cache.verify` — what makes a committed image damaged (lost/empty/undecodable chunk,
  checksum mismatch, non-finite values, impossible sizes, bad commit flag) and ``find_damaged``.
- :mod:`mfdetr.cache.views` — the stored views of an image (``orig``, and ``hflip``: a second detector
  run on the flipped image, stored as ``hflip_<array>`` with its own commit flags).
- :mod:`mfdetr.cache.stage0` — the frozen stage 0 a ``--c1 recompute`` store carries instead of C1
  (exported with ``torch.export``, stored as a data-only ATen program + tensors, loaded safely).

The schema (manifest JSON Schema + array table) lives in ``cache_schemas/v1`` and ships with the
package. The reader side (:class:`CacheStore`) never imports a detector: the stage-1 job
(:mod:`mfdetr.cache.run` and its plan, :mod:`mfdetr.cache.plan`) is imported on first use of its names only.
"""

from typing import TYPE_CHECKING

from mfdetr._lazy import lazy_exports

from mfdetr.cache.inspect import inspect_store
from mfdetr.cache.manifest import build_manifest, check_expectations, manifest_differences, validate_manifest_data
from mfdetr.cache.reader import CacheStore
from mfdetr.cache.schema import ArraySpec, enc_array_name, load_array_table, load_manifest_schema, resolve_array_table
from mfdetr.cache.writer import (
    COMMIT_DONE,
    COMMIT_PENDING,
    COMMIT_SKIPPED,
    BackgroundWriter,
    CacheWriter,
    ImageRecord,
    records_from_output,
)

__all__ = [
    "COMMIT_DONE",
    "COMMIT_PENDING",
    "COMMIT_SKIPPED",
    "ArraySpec",
    "BackgroundWriter",
    "CacheJob",
    "CacheStore",
    "CacheSummary",
    "CacheWriter",
    "ImageRecord",
    "build_manifest",
    "check_expectations",
    "enc_array_name",
    "inspect_store",
    "load_array_table",
    "load_manifest_schema",
    "manifest_differences",
    "parse_shard",
    "records_from_output",
    "resolve_array_table",
    "run_cache",
    "validate_manifest_data",
]

if TYPE_CHECKING:
    from mfdetr.cache.run import CacheJob, CacheSummary, parse_shard, run_cache

__getattr__, __dir__ = lazy_exports(
    __name__, {"CacheJob": "run", "CacheSummary": "run", "parse_shard": "run", "run_cache": "run"}, globals()
)
