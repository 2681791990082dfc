"""``mfdetr export --masknet-only``: the mask network as one ONNX graph with dynamic spatial sizes, run
in onnxruntime (CPU) at two input sizes and matched to PyTorch; one-line errors for bad requests."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import assert_user_error, cli
from tests._tiny_detector import save_masknet_checkpoint

SIZES = ((96, 128), (72, 112))  # two input sizes through one graph (neither is the export example's)


def _check_graph(onnx_path: Path, masknet: torch.nn.Module, preset: Any) -> None:
    import onnx
    import onnxruntime as ort

    from mfdetr.engine.inference.export import (
        MaskNetGraph,
        flat_inputs,
        masknet_example_inputs,
        masknet_input_names,
    )

    model = onnx.load(str(onnx_path))
    c1_dims = [d.dim_param or d.dim_value for d in model.graph.input[3].type.tensor_type.shape.dim]
    assert all(isinstance(v, str) and v for v in c1_dims[2:]), c1_dims  # symbolic H, W: not the example's
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert names == masknet_input_names(len(preset.level_strides))
    graph = MaskNetGraph(masknet).eval()
    for seed, (h, w) in enumerate(SIZES):
        args = masknet_example_inputs(preset, masknet.num_queries, h, w, seed=seed + 7)
        with torch.no_grad():
            ref = [t.numpy() for t in graph(*args)]
        got = sess.run(None, {n: t.numpy() for n, t in zip(names, flat_inputs(args), strict=True)})
        assert [g.shape for g in got] == [r.shape for r in ref]
        for name, g, r in zip(("mask_logits", "scores", "labels", "boxes_xyxy"), got, ref, strict=True):
            if name == "labels":
                assert np.array_equal(g, r)
            else:
                assert np.abs(g - r).max() <= 1e-4, (name, (h, w), float(np.abs(g - r).max()))
        assert float(np.abs(ref[0]).max()) > 0 and float(ref[1].max()) > 0  # real outputs, not all zero


@pytest.mark.parametrize("preset_name", ["demo", "hdetr_tiny"])
def test_masknet_only_onnx_matches_pytorch_at_two_sizes(preset_name: str, tmp_path: Path) -> None:
    from mfdetr.detectors import get_preset
    from mfdetr.engine.inference.export import ExportJob, export_masknet, run_export
    from mfdetr.engine.inference.predict import load_masknet_checkpoint

    preset = get_preset(preset_name)
    ckpt = save_masknet_checkpoint(tmp_path / "ckpt.pt", preset_name, seed=3)
    out = tmp_path / "masknet.onnx"
    lines: list[str] = []
    if preset_name == "demo":  # the command's own path (preset-sized example input)
        run_export(ExportJob(detector=preset_name, masknet=ckpt, out=out, masknet_only=True), echo=lines.append)
        assert lines and "opset" in lines[0]
    loaded = load_masknet_checkpoint(ckpt, preset=preset)
    if preset_name != "demo":  # a small example input keeps the test quick at 800-px presets
        export_masknet(loaded.model, preset, out, example_hw=(64, 80))
    assert out.is_file() and not list(tmp_path.glob(".*tmp*"))
    _check_graph(out, loaded.model, preset)


def test_export_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mfdetr.engine.inference.export import ExportJob, run_export
    from mfdetr.errors import MfdetrError

    proc = cli(
        "export",
        "--detector",
        "demo",
        "--masknet",
        tmp_path / "missing.pt",
        "--out",
        tmp_path / "m.onnx",
        "--masknet-only",
    )
    assert_user_error(proc, "missing.pt", "not found")
    assert not (tmp_path / "m.onnx").exists()
    ckpt = save_masknet_checkpoint(tmp_path / "ckpt.pt", "demo", seed=0)
    with pytest.raises(MfdetrError, match=r"m\.txt: the output must be a \.onnx file"):
        run_export(ExportJob(detector="demo", masknet=ckpt, out=tmp_path / "m.txt", masknet_only=True))
    with pytest.raises(MfdetrError, match="detector checkpoint file not found"):
        run_export(ExportJob(detector="demo", masknet=ckpt, out=tmp_path / "m.onnx", checkpoint=tmp_path / "nope.pth"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the extra not installed
    with pytest.raises(MfdetrError, match=r"needs the 'onnxruntime' package \(the 'export' extra\)"):
        run_export(ExportJob(detector="demo", masknet=ckpt, out=tmp_path / "m.onnx", masknet_only=True))


def _hdetr_tiny_checkpoint(path: Path) -> Path:
    from mfdetr.detectors import build_detector

    torch.manual_seed(5)
    torch.save(build_detector("hdetr_tiny", checkpoint=None, device="cpu").state_dict(), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("preset_name", ["demo", "hdetr_tiny"])
def test_whole_path_onnx_matches_pytorch_at_two_sizes(preset_name: str, tmp_path: Path) -> None:
    """Frozen detector (the shipped demo weights / a random tiny H-DETR) → MaskNet as one graph."""
    import onnx
    import onnxruntime as ort

    from mfdetr.detectors import build_detector, get_preset
    from mfdetr.engine.inference.export import ExportJob, FullGraph, export_full, run_export
    from mfdetr.engine.inference.predict import detector_checkpoint, load_masknet_checkpoint

    preset = get_preset(preset_name)
    ckpt = save_masknet_checkpoint(tmp_path / "ckpt.pt", preset_name, seed=4)
    loaded = load_masknet_checkpoint(ckpt, preset=preset)
    out = tmp_path / "full.onnx"
    topk = loaded.config.num_queries
    if preset_name == "demo":  # the command's own path, the preset's shipped weights
        det_ckpt = detector_checkpoint(preset, None)
        run_export(ExportJob(detector=preset_name, masknet=ckpt, out=out), echo=lambda s: None)
    else:  # a small example input keeps the test quick at 800-px presets
        det_ckpt = _hdetr_tiny_checkpoint(tmp_path / "det.pth")
        export_full(
            build_detector(preset_name, checkpoint=det_ckpt, device="cpu"),
            loaded.model,
            preset,
            out,
            topk=topk,
            example_hw=(96, 128),
        )  # every level ≥ 2 cells: a size-1 dim would be fixed
    model = onnx.load(str(out))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert all(isinstance(v, str) and v for v in dims[2:]), dims  # symbolic H, W
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    graph = FullGraph(build_detector(preset_name, checkpoint=det_ckpt, device="cpu"), loaded.model, topk=topk).eval()
    g = torch.Generator().manual_seed(1)
    for h, w in SIZES:
        image, orig = torch.randn(1, 3, h, w, generator=g), torch.tensor([[2 * h, 2 * w]])
        with torch.no_grad():
            ref = [t.numpy() for t in graph(image, orig)]
        got = sess.run(None, {"image": image.numpy(), "orig_hw": orig.numpy()})
        assert [a.shape for a in got] == [r.shape for r in ref] and ref[0].shape[1] == topk
        assert np.array_equal(got[2], ref[2])  # labels
        scale = np.array([2 * w, 2 * h, 2 * w, 2 * h], dtype=np.float32)  # boxes compared in image units
        for name, a, r in (
            ("mask_logits", got[0], ref[0]),
            ("scores", got[1], ref[1]),
            ("boxes", got[3] / scale, ref[3] / scale),
        ):
            assert np.abs(a - r).max() <= 1e-4, (name, (h, w), float(np.abs(a - r).max()))
