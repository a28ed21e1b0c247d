"""Geometric normals expert: surface normals derived from a depth expert's output.

Each pixel is back-projected with a pinhole camera of a given field of view, and the normal is the
cross product of the point cloud's image-space derivatives, facing the camera. Frame: x right,
y down, z forward (OpenCV), as in the schema. Relative inverse depth (DPT, Depth Anything) is
inverted first; its unknown shift distorts the geometry, so such normals are approximate.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from clipzoo_jax.data import records
from clipzoo_jax.experts import base, resize


def intrinsics_for(height: int, width: int, fov_degrees: float) -> tuple[float, float, float, float]:
  """(fx, fy, cx, cy) of a pinhole camera with square pixels and the given horizontal field of view."""
  focal = (width / 2.0) / math.tan(math.radians(fov_degrees) / 2.0)
  return focal, focal, (width - 1) / 2.0, (height - 1) / 2.0


def backproject(depth: np.ndarray, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
  """(H, W) z-depth -> (H, W, 3) camera-frame points."""
  rows, cols = np.meshgrid(np.arange(depth.shape[0]), np.arange(depth.shape[1]), indexing="ij")
  return np.stack([(cols - cx) / fx * depth, (rows - cy) / fy * depth, depth], axis=-1)


def normals_from_depth(depth: np.ndarray, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
  """(H, W) z-depth -> (H, W, 3) unit normals facing the camera; 0 where depth or a neighbour is invalid."""
  depth = np.asarray(depth, np.float64)
  valid = np.isfinite(depth) & (depth > 0)
  points = backproject(np.where(valid, depth, np.nan), fx, fy, cx, cy)
  if min(depth.shape) < 2:
    return np.zeros(depth.shape + (3,), np.float32)
  d_rows, d_cols = np.gradient(points, axis=(0, 1))
  normals = np.cross(d_rows, d_cols)
  normals = np.where((np.sum(normals * points, axis=-1) > 0)[..., None], -normals, normals)
  length = np.linalg.norm(normals, axis=-1)
  keep = valid & np.isfinite(length) & (length > 1e-12)
  return np.where(keep[..., None], normals / np.where(keep, length, 1.0)[..., None], 0.0).astype(np.float32)


def depth_from_inverse(inverse_depth: np.ndarray) -> np.ndarray:
  inverse_depth = np.asarray(inverse_depth, np.float64)
  valid = np.isfinite(inverse_depth) & (inverse_depth > 0)
  return np.where(valid, 1.0 / np.where(valid, inverse_depth, 1.0), 0.0)


@base.register("depth_normals")
class DepthNormalsExpert(base.Expert):
  """Normals from depth: its own depth expert (`depth` config), or the job's depth task output
  (`from_task="depth"`, no second forward pass)."""
  kind = "depth_normals"

  def __init__(self, task: str, depth: Mapping | None = None, from_task: str | None = None,
               fov_degrees: float = 60.0, label_scale: float = 1.0,
               label_max_side: int | None = None):
    if (depth is None) == (from_task is None):
      raise base.ExpertError(f"experts.{task}: set exactly one of `depth` (a depth expert config) "
                             f"or `from_task` (a task of this job), found depth={depth!r}, "
                             f"from_task={from_task!r}")
    self.task, self.fov_degrees = task, float(fov_degrees)
    self.resolution = base.resolution_from(label_scale, label_max_side)
    self.depth_expert = None if depth is None else base.build_expert("depth", depth)
    self.needs = () if from_task is None else (from_task,)

  def bind(self, experts: Mapping[str, base.Expert]) -> None:
    if self.needs:
      self.depth_expert = experts[self.needs[0]]

  @property
  def source(self) -> str:
    return self.depth_expert.source if self.depth_expert else "<unbound>"

  def prepare(self, image: np.ndarray, key: str):
    return None if self.needs else self.depth_expert.prepare(image, key)

  def run(self, prepared: Sequence, batch: base.Batch) -> list[records.Labels]:
    if self.needs:
      depths = [labels.depth for labels in batch.labels]
    else:
      depths = [labels.depth for labels in self.depth_expert.run(prepared, batch)]
    return [records.Labels(normals=self.normals(depth, image))
            for depth, image in zip(depths, batch.images)]

  def normals(self, depth: np.ndarray, image: np.ndarray) -> np.ndarray:
    if self.depth_expert.depth_kind == "inverse":
      depth = depth_from_inverse(depth)
    normals = normals_from_depth(depth, *intrinsics_for(*depth.shape, self.fov_degrees))
    return resize.resize_normals(normals, self.label_size(image))

  def weights_sha256(self) -> str | None:
    return self.depth_expert.weights_sha256()

  def manifest_entry(self) -> dict:
    entry = super().manifest_entry()
    entry["fov_degrees"] = self.fov_degrees
    depth_entry = self.depth_expert.manifest_entry()
    entry["depth_expert"] = depth_entry["expert"]
    entry["depth_label_resolution"] = depth_entry["label_resolution"]
    entry["from_depth_kind"] = self.depth_expert.depth_kind
    return entry
