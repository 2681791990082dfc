"""Shapes, textures and backgrounds of the synthetic COCO-format dataset (numpy, vectorised).

Every category differs in **shape** and in **appearance family** (texture kind + hue range), and
every instance varies its colours and texture parameters, so no class is one flat colour:

======  =========  ===========================  ============
id      name       shape                        texture
======  =========  ===========================  ============
1       disc       ellipse (aspect 0.7–1)       dots
2       box        rotated rectangle            checkerboard
3       triangle   rotated triangle             stripes
4       arc        thick open ring ("C")        radial gradient
5       cross      plus sign                    pixel noise
6       star       5-lobed star                 linear gradient
======  =========  ===========================  ============

Geometry is evaluated at pixel centres in the object's rotated frame ``(u, v)``; textures are
computed in the same frame so they rotate with the object.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SynthClass:
    """One synthetic category: COCO id, name, shape and texture kinds, hue centre in [0, 1)."""

    id: int
    name: str
    shape: str
    texture: str
    hue: float


SYNTH_CLASSES: tuple[SynthClass, ...] = (
    SynthClass(1, "disc", "ellipse", "dots", 0.00),
    SynthClass(2, "box", "rectangle", "checker", 0.62),
    SynthClass(3, "triangle", "triangle", "stripes", 0.30),
    SynthClass(4, "arc", "arc", "radial", 0.08),
    SynthClass(5, "cross", "cross", "noise", 0.50),
    SynthClass(6, "star", "star", "gradient", 0.83),
)

_EXTENT = 1.05  # every shape lies within radius _EXTENT * a of its centre


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray, a: float, aspect: float) -> np.ndarray:
    """Bool mask of ``shape`` with half-size ``a`` px at local coords ``(u, v)`` (pixel centres)."""
    if shape == "ellipse":
        return (u / a) ** 2 + (v / (a * aspect)) ** 2 <= 1.0
    if shape == "rectangle":
        return (np.abs(u) <= a * 0.75) & (np.abs(v) <= a * 0.75 * aspect)
    if shape == "triangle":  # equilateral, circumradius a (inradius a/2)
        m = np.ones(u.shape, dtype=bool)
        for k in range(3):
            t = np.pi / 2 + 2 * np.pi * k / 3
            m &= u * np.cos(t) + v * np.sin(t) <= a / 2
        return m
    if shape == "arc":  # ring of radii 0.55a..a with a 70° gap
        r2 = (u * u + v * v) / (a * a)
        return (r2 <= 1.0) & (r2 >= 0.55**2) & (np.abs(np.arctan2(v, u)) > 0.6)
    if shape == "cross":
        t = 0.32 * a
        return ((np.abs(u) <= a * 0.95) & (np.abs(v) <= t)) | ((np.abs(u) <= t) & (np.abs(v) <= a * 0.95))
    if shape == "star":
        r = np.sqrt(u * u + v * v)
        return r <= a * (0.62 + 0.38 * np.cos(5 * np.arctan2(v, u)))
    raise ValueError(f"unknown shape {shape!r}")


def texture(kind: str, u: np.ndarray, v: np.ndarray, a: float, hue: float, rng: np.random.Generator) -> np.ndarray:
    """RGB float32 ``[h, w, 3]`` appearance of one instance (per-instance colours and parameters)."""
    h = hue + rng.normal(0.0, 0.035)
    c1 = _hsv(h, rng.uniform(0.55, 0.95), rng.uniform(0.55, 0.95))
    c2 = _hsv(h + rng.uniform(-0.12, 0.12), rng.uniform(0.1, 0.5), rng.uniform(0.15, 1.0))
    if kind == "dots":
        p = rng.uniform(4.0, 9.0)
        du = np.mod(u + rng.uniform(0, p), p) - p / 2
        dv = np.mod(v + rng.uniform(0, p), p) - p / 2
        t = (du * du + dv * dv <= (p * rng.uniform(0.22, 0.35)) ** 2).astype(np.float32)
    elif kind == "checker":
        c = rng.uniform(3.0, 8.0)
        t = np.mod(np.floor(u / c) + np.floor(v / c), 2).astype(np.float32)
    elif kind == "stripes":
        p, phi = rng.uniform(3.0, 8.0), rng.uniform(0, np.pi)
        t = (np.sin(2 * np.pi * (u * np.cos(phi) + v * np.sin(phi)) / p) > 0).astype(np.float32)
    elif kind == "radial":
        t = np.clip(np.sqrt(u * u + v * v) / a, 0.0, 1.0).astype(np.float32)
    elif kind == "noise":
        t = np.clip(rng.normal(0.5, 0.28, size=u.shape), 0.0, 1.0).astype(np.float32)
    elif kind == "gradient":
        phi = rng.uniform(-0.5, 0.5)
        t = np.clip((u * np.cos(phi) + v * np.sin(phi)) / (2 * a) + 0.5, 0.0, 1.0).astype(np.float32)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    t = t[..., None]
    return c1 * (1.0 - t) + c2 * t


def render_object(
    cls: SynthClass,
    *,
    cx: float,
    cy: float,
    a: float,
    aspect: float,
    angle: float,
    height: int,
    width: int,
    rng: np.random.Generator,
) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
    """Rasterise one object clipped to the image.

    Returns ``(rows, cols, mask [h, w] bool, rgb [h, w, 3] float32)`` of its on-image crop, or
    ``None`` when nothing of it lies inside the image.
    """
    r = _EXTENT * a
    x0, x1 = max(0, int(np.floor(cx - r))), min(width, int(np.ceil(cx + r)) + 1)
    y0, y1 = max(0, int(np.floor(cy - r))), min(height, int(np.ceil(cy + r)) + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    xs = np.arange(x0, x1, dtype=np.float32) + 0.5 - cx
    ys = np.arange(y0, y1, dtype=np.float32) + 0.5 - cy
    ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = ca * xs[None, :] + sa * ys[:, None]
    v = -sa * xs[None, :] + ca * ys[:, None]
    mask = shape_mask(cls.shape, u, v, a, aspect)
    if not mask.any():
        return None
    rgb = texture(cls.texture, u, v, a, cls.hue, rng)
    return slice(y0, y1), slice(x0, x1), mask, rgb


def _linear_upsample_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of linear interpolation from a coarse grid spanning the output."""
    pos = np.linspace(0.0, n_in - 1.0, n_out, dtype=np.float32)
    lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Textured background ``[H, W, 3]`` float32: muted base colour + plane waves + smooth blotches
    + pixel noise."""
    base = _hsv(rng.uniform(), rng.uniform(0.05, 0.4), rng.uniform(0.3, 0.8))
    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    img = np.empty((height, width, 3), dtype=np.float32)
    img[:] = base
    for _ in range(int(rng.integers(1, 4))):
        per, phi = rng.uniform(12.0, 80.0), rng.uniform(0, 2 * np.pi)
        wave = np.sin(
            (2 * np.pi / per) * (xx * np.float32(np.cos(phi)) + yy * np.float32(np.sin(phi)))
            + np.float32(rng.uniform(0, 2 * np.pi))
        )
        img += wave[..., None] * rng.uniform(-30, 30, size=3).astype(np.float32)
    gh, gw = height // 16 + 2, width // 16 + 2
    coarse = rng.standard_normal((gh, gw * 3), dtype=np.float32) * np.float32(18.0)
    smooth = _linear_upsample_matrix(height, gh) @ coarse  # [H, gw*3]
    smooth = smooth.reshape(height, gw, 3).transpose(0, 2, 1) @ _linear_upsample_matrix(width, gw).T  # [H,3,W]
    img += smooth.transpose(0, 2, 1)
    img += rng.standard_normal((height, width, 3), dtype=np.float32) * np.float32(5.0)
    return img
