"""Position-embedding resizing for a new image resolution (class token kept, patch grid
interpolated) or a shorter text context (truncated). Pure NumPy.

Interpolation follows `torch.nn.functional.interpolate(..., align_corners=False)` without
antialiasing (bicubic with a = -0.75, border samples clamped), which is what Hugging Face CLIP's
`interpolate_pos_encoding` does, so a resized import matches HF run at the new resolution.
"""

from __future__ import annotations

import math

import numpy as np

METHODS = ("bicubic", "bilinear")
CUBIC_A = -0.75  # PyTorch's bicubic coefficient


def _cubic(x: np.ndarray) -> np.ndarray:
  """Keys' cubic convolution kernel at distances x >= 0."""
  a = CUBIC_A
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def interpolation_matrix(in_size: int, out_size: int, method: str = "bicubic") -> np.ndarray:
  """(out_size, in_size) float64 weights of a 1-D resize with half-pixel centres."""
  if method not in METHODS:
    raise ValueError(f"position-embedding resize: method expected one of {METHODS}, "
                     f"found {method!r}")
  source = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  weights = np.zeros((out_size, in_size))
  rows = np.arange(out_size)
  if method == "bilinear":
    source = np.maximum(source, 0.0)  # PyTorch clamps only for linear modes
    low = np.floor(source).astype(int)
    frac = source - low
    np.add.at(weights, (rows, np.minimum(low, in_size - 1)), 1 - frac)
    np.add.at(weights, (rows, np.minimum(low + 1, in_size - 1)), frac)
    return weights
  low = np.floor(source).astype(int)
  frac = source - low
  for offset in (-1, 0, 1, 2):
    index = np.clip(low + offset, 0, in_size - 1)
    np.add.at(weights, (rows, index), _cubic(np.abs(frac - offset)))
  return weights


def resize_image_pos_embedding(pos: np.ndarray, grid: int, method: str = "bicubic") -> np.ndarray:
  """(1 + g*g, D) -> (1 + grid*grid, D): row 0 (class token) kept, the g x g grid resized."""
  old = math.isqrt(pos.shape[0] - 1)
  if old * old + 1 != pos.shape[0]:
    raise ValueError(f"image position embedding: expected 1 + a square number of rows, found "
                     f"shape {pos.shape}")
  if old == grid:
    return pos
  weights = interpolation_matrix(old, grid, method)
  patches = pos[1:].reshape(old, old, -1).astype(np.float64)
  resized = np.einsum("ai,bj,ijd->abd", weights, weights, patches).reshape(grid * grid, -1)
  return np.concatenate([pos[:1], resized.astype(pos.dtype)], axis=0)


def truncate_text_pos_embedding(pos: np.ndarray, length: int) -> np.ndarray:
  """(L, W) -> (length, W): a shorter context keeps the first positions; a longer one cannot be
  invented."""
  if length > pos.shape[0]:
    raise ValueError(f"text position embedding: the source has {pos.shape[0]} positions, the "
                     f"run's context_length {length} is longer (it can only be shorter)")
  return pos[:length]
