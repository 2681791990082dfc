"""``fake_held``: the ``fake_tiny`` test detector, except that with ``MFDETR_TEST_HOLD_AT=<n>`` in the
environment its ``n``-th ``detect`` call (1-based, whatever image the cache's size-grouped order puts
there) waits until the process is interrupted — so a test can interrupt a real ``mfdetr cache`` after
exactly ``n - 1`` batches. Importing this module
registers it (subprocess tests select it with ``MFDETR_PLUGINS=tests._held_detector``)."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import tests._fake_detector as fd
from mfdetr.detectors.registry import list_detectors, register_detector

NAME = "fake_held"
HOLD_ENV = "MFDETR_TEST_HOLD_AT"


class _Held:
    def __init__(self, det: Any, hold_at: int) -> None:
        self.det, self.hold_at, self.calls = det, hold_at, 0

    def __call__(self, batch: Any, **kw: Any) -> Any:
        self.calls += 1
        if self.calls == self.hold_at:
            while True:  # until SIGINT raises KeyboardInterrupt here
                time.sleep(0.05)
        return self.det.__class__.detect(self.det, batch, **kw)


def build_held(*, checkpoint: Any = None, device: str = "cpu") -> Any:
    det = fd.build_fake(checkpoint=checkpoint, device=device)
    if os.environ.get(HOLD_ENV):
        det.detect = _Held(det, int(os.environ[HOLD_ENV]))
    return det


if NAME not in list_detectors():
    register_detector(dataclasses.replace(fd.PRESET, name=NAME), build_held)
