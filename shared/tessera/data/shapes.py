"""Signed distance functions of the shapes: one cheap pass gives fill, outline and glow."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

FloatArray = np.ndarray
ShapeSdf = Callable[[FloatArray, FloatArray, float], FloatArray]

_SQRT3 = float(np.sqrt(3.0))
_STAR_K1 = (0.809016994375, -0.587785252292)
_STAR_INNER_RATIO = 0.5


def _box(x: FloatArray, y: FloatArray, half_w: float, half_h: float) -> FloatArray:
    """Distance to an axis-aligned box centred at the origin."""
    qx = np.abs(x) - half_w
    qy = np.abs(y) - half_h
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    inside = np.minimum(np.maximum(qx, qy), 0.0)
    return outside + inside


def circle(x: FloatArray, y: FloatArray, radius: float) -> FloatArray:
    """Distance to a circle of the given radius."""
    return np.hypot(x, y) - radius


def square(x: FloatArray, y: FloatArray, radius: float) -> FloatArray:
    """Distance to a square whose area is close to the circle's of the same radius."""
    half = 0.86 * radius
    return _box(x, y, half, half)


def triangle(x: FloatArray, y: FloatArray, radius: float) -> FloatArray:
    """Distance to an upright equilateral triangle (y grows downwards, as in images)."""
    r = 1.05 * radius
    px = np.abs(x) - r
    py = -y + r / _SQRT3
    fold = px + _SQRT3 * py > 0.0
    fx = np.where(fold, (px - _SQRT3 * py) / 2.0, px)
    fy = np.where(fold, (-_SQRT3 * px - py) / 2.0, py)
    fx = fx - np.clip(fx, -2.0 * r, 0.0)
    return -np.hypot(fx, fy) * np.sign(fy)


def star(x: FloatArray, y: FloatArray, radius: float) -> FloatArray:
    """Distance to an upright five-pointed star with fat arms, readable at 32x32."""
    r = 1.25 * radius
    k1x, k1y = _STAR_K1
    k2x, k2y = -k1x, k1y
    px = np.abs(x)
    py = -y
    d1 = np.maximum(k1x * px + k1y * py, 0.0)
    px, py = px - 2.0 * d1 * k1x, py - 2.0 * d1 * k1y
    d2 = np.maximum(k2x * px + k2y * py, 0.0)
    px, py = px - 2.0 * d2 * k2x, py - 2.0 * d2 * k2y
    px = np.abs(px)
    py = py - r
    bax, bay = _STAR_INNER_RATIO * -k1y, _STAR_INNER_RATIO * k1x - 1.0
    h = np.clip((px * bax + py * bay) / (bax * bax + bay * bay), 0.0, r)
    return np.hypot(px - bax * h, py - bay * h) * np.sign(py * bax - px * bay)


def cross(x: FloatArray, y: FloatArray, radius: float) -> FloatArray:
    """Distance (exact outside, close inside) to a plus-shaped cross."""
    arm = 1.02 * radius
    width = 0.38 * radius
    return np.minimum(_box(x, y, arm, width), _box(x, y, width, arm))


SHAPE_SDFS: dict[str, ShapeSdf] = {
    "circle": circle,
    "square": square,
    "triangle": triangle,
    "star": star,
    "cross": cross,
}


def shape_sdf(
    shape: str, size: int, centre: tuple[float, float], radius: float, angle_deg: float
) -> FloatArray:
    """Signed distance in pixels from each pixel centre of a size x size canvas to the shape."""
    if shape not in SHAPE_SDFS:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    coords = np.arange(size, dtype=np.float64) + 0.5
    x = coords[None, :] - centre[0]
    y = coords[:, None] - centre[1]
    theta = np.deg2rad(angle_deg)
    c, s = np.cos(theta), np.sin(theta)
    xr = c * x + s * y
    yr = -s * x + c * y
    return SHAPE_SDFS[shape](xr, yr, radius)


def coverage(sdf: FloatArray) -> FloatArray:
    """Anti-aliased share of each pixel inside the shape (distance in pixels, one-pixel ramp)."""
    return np.clip(0.5 - sdf, 0.0, 1.0)
