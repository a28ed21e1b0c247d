"""Label resolution policy and label resizing: nearest for class maps, valid-aware for depth/normals.

Pure NumPy. The linear resampling matrices follow Pillow's antialiased BILINEAR filter, so a
fully valid depth map resizes exactly as `Image.resize(..., BILINEAR)` would resize it.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class LabelResolution:
  """Where dense labels are stored relative to their image: a scale, optionally a cap on the long side.

  `scale=0.25` stores labels at a quarter of the image resolution (DESIGN.md: labels are at most
  image resolution). `max_side` caps the longer label side, for corpora with huge images.
  """
  scale: float = 1.0
  max_side: int | None = None

  def __post_init__(self):
    if not 0.0 < self.scale <= 1.0:
      raise ValueError(f"label resolution scale must be in (0, 1], found {self.scale}")
    if self.max_side is not None and self.max_side < 1:
      raise ValueError(f"label resolution max_side must be >= 1, found {self.max_side}")

  def size_for(self, height: int, width: int) -> tuple[int, int]:
    scale = self.scale
    if self.max_side is not None and max(height, width) * scale > self.max_side:
      scale = self.max_side / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))

  def to_json(self) -> dict:
    return {"relative_to_image": self.scale, "max_side": self.max_side}


def linear_weights(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) row-normalized triangle-filter weights, widened when shrinking (antialias)."""
  scale = in_size / out_size
  support = max(scale, 1.0)
  centers = (np.arange(out_size) + 0.5) * scale
  distance = (np.arange(in_size)[None, :] + 0.5 - centers[:, None]) / support
  weights = np.maximum(0.0, 1.0 - np.abs(distance))
  return weights / weights.sum(axis=1, keepdims=True)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output pixel centre (Pillow's NEAREST convention)."""
  return np.minimum(((np.arange(out_size) + 0.5) * in_size / out_size).astype(np.int64), in_size - 1)


def resize_class_map(class_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Nearest neighbour: a class id is never blended with its neighbours."""
  height, width = class_map.shape[:2]
  if (height, width) == tuple(size):
    return class_map
  return class_map[nearest_indices(height, size[0])][:, nearest_indices(width, size[1])]


def _weighted_resize(values: np.ndarray, valid: np.ndarray, size: tuple[int, int]):
  """Resizes values * valid and valid with the same weights; returns (sum of values, weight)."""
  rows = linear_weights(values.shape[0], size[0])
  cols = linear_weights(values.shape[1], size[1])
  weight = rows @ valid.astype(np.float64) @ cols.T
  masked = np.where(valid[..., None], values, 0.0) if values.ndim == 3 else np.where(valid, values, 0.0)
  if values.ndim == 3:
    total = np.einsum("oh,hwc,pw->opc", rows, masked, cols)
  else:
    total = rows @ masked @ cols.T
  return total, weight


def resize_depth(depth: np.ndarray, size: tuple[int, int], min_valid: float = 0.5) -> np.ndarray:
  """Valid-aware linear resize: invalid pixels (0 or non-finite) never blend into valid ones.

  An output pixel is the weighted mean of the valid inputs under its filter, and is invalid (0)
  when less than `min_valid` of its filter weight lies on valid inputs.
  """
  depth = np.asarray(depth, np.float64)
  if depth.shape == tuple(size):
    return np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)
  valid = np.isfinite(depth) & (depth > 0)
  total, weight = _weighted_resize(depth, valid, size)
  keep = weight >= min_valid
  return np.where(keep, total / np.where(keep, weight, 1.0), 0.0).astype(np.float32)


def resize_normals(normals: np.ndarray, size: tuple[int, int], min_valid: float = 0.5) -> np.ndarray:
  """Valid-aware linear resize of (H, W, 3) normals, re-normalized to unit length; invalid = 0."""
  normals = np.asarray(normals, np.float64)
  norm = np.linalg.norm(normals, axis=-1)
  valid = np.isfinite(norm) & (norm > 1e-6)
  if normals.shape[:2] == tuple(size):
    total, weight = np.where(valid[..., None], normals, 0.0), valid.astype(np.float64)
  else:
    total, weight = _weighted_resize(normals, valid, size)
  length = np.linalg.norm(total, axis=-1)
  keep = (weight >= min_valid) & (length > 1e-6)
  unit = total / np.where(keep, length, 1.0)[..., None]
  return np.where(keep[..., None], unit, 0.0).astype(np.float32)
