from __future__ import annotations

import pytest
import torch

from mfdetr.devices import resolve_device
from mfdetr.errors import MfdetrError


def test_cpu_and_auto(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_is_a_user_error():
    with pytest.raises(MfdetrError, match="CUDA is not available"):
        resolve_device("cuda")


def test_unknown_device_is_a_user_error():
    with pytest.raises(MfdetrError, match="unknown device"):
        resolve_device("tpu-ish")
