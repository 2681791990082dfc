"""Caching with ``--batch-size N`` batches only images of one input size, so a real (tiny) DINO —
which is not padding-invariant — writes the same features as with batch 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests._fake_detector import read_all
from tests._tiny_detector import NAME, save_detector_checkpoint


def test_batched_cache_equals_batch_one_for_a_real_dino(tmp_path: Path) -> None:
    from mfdetr.cache import CacheJob, run_cache
    from mfdetr.data import CocoInstances, SynthConfig, generate_synth, same_size_batches

    # seed 22: no square image (dino_tiny64 cannot run a square 40-px image alone: its stride-64 level
    # is 1 x 1 and the input GroupNorm refuses a single value per group)
    generate_synth(tmp_path / "synth", config=SynthConfig(train=0, val=8, image_size=40, seed=22))
    ds = CocoInstances(tmp_path / "synth", "val2017", with_targets=False)
    sizes = {(im["height"], im["width"]) for im in (ds.image_info(i) for i in ds.image_ids)}
    assert len(sizes) >= 3  # mixed sizes: a plain batch of 4 would be padded
    batches = same_size_batches(ds, range(len(ds)), 4)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    assert all(
        len({(ds.image_info(ds.image_ids[i])["height"], ds.image_info(ds.image_ids[i])["width"]) for i in b}) == 1
        and len(b) <= 4
        for b in batches
    )
    det = save_detector_checkpoint(tmp_path / "det.pth")
    stores = {}
    for bs in (1, 4):
        stores[bs] = tmp_path / f"cache_bs{bs}"
        run_cache(
            CacheJob(
                detector=NAME,
                checkpoint=det,
                coco=tmp_path / "synth",
                split="val2017",
                out=stores[bs],
                topk=10,
                enc_layers=(4,),
                batch_size=bs,
                num_workers=0,
            ),
            progress=False,
            echo=lambda *a, **k: None,
        )
    a, b = read_all(stores[1]), read_all(stores[4])
    assert sorted(a) == sorted(b)
    for name in a:
        if np.issubdtype(a[name].dtype, np.floating):
            np.testing.assert_allclose(
                a[name].astype(np.float32), b[name].astype(np.float32), atol=2e-3, rtol=2e-3, err_msg=name
            )
        else:
            assert np.array_equal(a[name], b[name]), name
