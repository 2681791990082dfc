"""The hand-written TensorBoard event files parse back (own reader; tensorboard's when importable)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from mfdetr.engine.tfevents import (EventFileWriter, crc32c, crc32c_py, decode_event, encode_event, frame_record,
                                    masked_crc32c, read_records, read_scalars)


def test_crc32c_known_values() -> None:
    # RFC 3720 B.4 check value and the all-zero 32-byte vector
    assert crc32c_py(b"123456789") == 0xE3069283 == crc32c(b"123456789")
    assert crc32c_py(bytes(32)) == 0x8A9136AA
    assert masked_crc32c(b"") == ((((0 >> 15) | (0 << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def test_event_roundtrip_and_framing(tmp_path: Path) -> None:
    w = EventFileWriter(tmp_path)
    w.add_scalars(7, {"train/loss": 0.25, "train/lr": 1.5e-4}, wall_time=123.5)
    w.add_scalars(2**40, {"eval/AP": -3.0})
    w.close()
    recs = list(read_records(w.path))
    assert decode_event(recs[0])["file_version"] == "brain.Event:2"
    ev = decode_event(recs[1])
    assert ev["step"] == 7 and ev["wall_time"] == 123.5
    assert ev["scalars"] == {"train/loss": 0.25, "train/lr": pytest.approx(1.5e-4, rel=1e-6)}
    assert read_scalars(w.path)[-1] == (2**40, "eval/AP", -3.0)
    # framing: 8-byte length, masked CRC of the length, payload, masked CRC of the payload
    raw = w.path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert raw[12:12 + n] == recs[0] and struct.unpack("<I", raw[12 + n:16 + n])[0] == masked_crc32c(recs[0])
    # corruption is detected
    bad = bytearray(raw)
    bad[14] ^= 0xFF
    (tmp_path / "bad").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="CRC"):
        list(read_records(tmp_path / "bad"))
    assert frame_record(b"x")[-5] == ord("x")
    # negative steps are 10-byte varints
    assert decode_event(encode_event(wall_time=0.0, step=-1))["step"] == -1


def test_tensorboard_reads_our_file(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # type: ignore

    w = EventFileWriter(tmp_path)
    for s in range(3):
        w.add_scalars(s, {"loss": 1.0 / (s + 1)})
    w.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([1.0, 0.5, 1 / 3])
