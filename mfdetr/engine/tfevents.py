"""A minimal TensorBoard event-file writer (scalars only) and a reader to check it.

No ``tensorboard`` dependency: the file format is small and stable.

- Record framing (TFRecord): ``uint64 len`` (little endian), ``uint32 masked_crc32c(len bytes)``,
  ``data``, ``uint32 masked_crc32c(data)``; ``masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8``.
- ``data`` is a serialized ``tensorflow.Event`` protobuf; we hand-encode the fields we use:
  ``wall_time`` (1, double), ``step`` (2, int64 varint), ``file_version`` (3, string),
  ``summary`` (5, message) → ``Summary.value`` (1, repeated message) → ``Summary.Value`` with
  ``tag`` (1, string) and ``simple_value`` (2, float).

The first record of a file is an Event with ``file_version = "brain.Event:2"``.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

try:  # optional C implementation (a zarr/numcodecs dependency); the table below is the fallback
    import google_crc32c as _gcrc  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the environment
    _gcrc = None


def _make_table() -> list[int]:
    poly = 0x82F63B78  # CRC-32C (Castagnoli), reflected
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def crc32c_py(data: bytes) -> int:
    """CRC-32C of ``data`` (pure Python, table driven)."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (C implementation when importable)."""
    if _gcrc is not None:
        return int(_gcrc.value(bytes(data)))
    return crc32c_py(data)


def masked_crc32c(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---- protobuf encoding (only what an Event with scalar summaries needs) ----

def _varint(n: int) -> bytes:
    if n < 0:
        n &= (1 << 64) - 1  # int64 negative values are 10-byte varints
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _len_delimited(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def encode_event(*, wall_time: float, step: int = 0, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
    """Serialize an ``Event`` with optional ``file_version`` and scalar ``Summary.Value``s."""
    out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _len_delimited(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _len_delimited(1, _len_delimited(1, tag.encode()) + _key(2, 5) + struct.pack("<f", float(v)))
            for tag, v in scalars.items())
        out += _len_delimited(5, summary)
    return out


def frame_record(data: bytes) -> bytes:
    """TFRecord framing of one serialized record."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


class EventFileWriter:
    """Append scalar summaries to ``<logdir>/events.out.tfevents.<time>.<host>.<pid>``.

    Each process launch writes its own file (TensorBoard merges the files of a directory).
    """

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = self.logdir / name
        self._f: BinaryIO | None = self.path.open("ab")
        self._write(encode_event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        assert self._f is not None, "writer is closed"
        self._f.write(frame_record(data))

    def add_scalars(self, step: int, scalars: Mapping[str, float], wall_time: float | None = None) -> None:
        """Write one Event holding every ``tag → value`` of ``scalars`` at ``step``."""
        self._write(encode_event(wall_time=time.time() if wall_time is None else wall_time, step=step,
                                 scalars=scalars))

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


# ---- reader (used by tests and `mfdetr plot`) ----

def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _read_varint(buf, pos)
            yield field, wire, val
        elif wire == 1:
            yield field, wire, buf[pos:pos + 8]
            pos += 8
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            yield field, wire, buf[pos:pos + n]
            pos += n
        elif wire == 5:
            yield field, wire, buf[pos:pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def decode_event(data: bytes) -> dict[str, object]:
    """Decode an Event into ``{"wall_time", "step", "file_version"?, "scalars": {tag: value}}``."""
    ev: dict[str, object] = {"wall_time": 0.0, "step": 0, "scalars": {}}
    scalars: dict[str, float] = {}
    for field, _wire, val in _fields(data):
        if field == 1:
            ev["wall_time"] = struct.unpack("<d", val)[0]  # type: ignore[arg-type]
        elif field == 2:
            step = int(val)  # type: ignore[call-overload]
            ev["step"] = step - (1 << 64) if step >= 1 << 63 else step
        elif field == 3:
            ev["file_version"] = bytes(val).decode()  # type: ignore[arg-type]
        elif field == 5:
            for f2, _w2, v in _fields(bytes(val)):  # type: ignore[arg-type]
                if f2 != 1:
                    continue
                tag, simple = "", None
                for f3, _w3, v3 in _fields(bytes(v)):  # type: ignore[arg-type]
                    if f3 == 1:
                        tag = bytes(v3).decode()  # type: ignore[arg-type]
                    elif f3 == 2:
                        simple = struct.unpack("<f", v3)[0]  # type: ignore[arg-type]
                if simple is not None:
                    scalars[tag] = float(simple)
    ev["scalars"] = scalars
    return ev


def read_records(path: str | Path) -> Iterator[bytes]:
    """Yield the payloads of a TFRecord file, verifying both CRCs (``ValueError`` on corruption)."""
    data = Path(path).read_bytes()
    pos = 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f"{path}: truncated record header at byte {pos}")
        header = data[pos:pos + 8]
        (n,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        if hcrc != masked_crc32c(header):
            raise ValueError(f"{path}: bad length CRC at byte {pos}")
        payload = data[pos + 12:pos + 12 + n]
        if len(payload) != n or pos + 16 + n > len(data):
            raise ValueError(f"{path}: truncated record at byte {pos}")
        (dcrc,) = struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])
        if dcrc != masked_crc32c(payload):
            raise ValueError(f"{path}: bad data CRC at byte {pos}")
        yield payload
        pos += 16 + n


def read_scalars(path: str | Path) -> list[tuple[int, str, float]]:
    """All ``(step, tag, value)`` scalars of an event file, in file order."""
    out = []
    for rec in read_records(path):
        ev = decode_event(rec)
        for tag, v in ev["scalars"].items():  # type: ignore[attr-defined]
            out.append((int(ev["step"]), tag, v))  # type: ignore[call-overload]
    return out
