"""Light dense task heads on the image tower's patch-token grid (segmentation, depth, normals,
CenterNet-style detection): LayerNorm, a 3x3 conv, then x2 upsample + 3x3 conv stages."""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipzoo_jax.models import transformer as tfm

HEAD_TASKS = ("seg", "depth", "normals", "det")
DET_HEATMAP_PRIOR = 0.1  # initial foreground probability of the heatmap, as CenterNet


def conv_init():
  return tfm.dense_init(("conv_height", "conv_width", "conv_in", "conv_out"))


class UpsampleHead(nn.Module):
  """Patch grid (B, g, g, D) -> (B, g*upsample, g*upsample, out_channels)."""
  out_channels: int
  hidden: int
  upsample: int
  out_bias_init: float = 0.0
  dtype: tfm.Dtype = jnp.float32

  @nn.compact
  def __call__(self, grid):
    stages = int(round(math.log2(self.upsample)))
    if 2 ** stages != self.upsample:
      raise ValueError(f"model.heads.upsample must be a power of 2, found {self.upsample}")
    conv = lambda features, size, name: nn.Conv(
        features, (size, size), dtype=self.dtype, name=name, kernel_init=conv_init(),
        bias_init=tfm.zeros_init(("conv_out",)))
    x = tfm.LayerNorm(1e-5, self.dtype, name="ln")(grid)
    x = jax.nn.gelu(conv(self.hidden, 3, "conv_in")(x))
    for stage in range(stages):
      batch, height, width, channels = x.shape
      x = jax.image.resize(x, (batch, 2 * height, 2 * width, channels), "bilinear")
      x = jax.nn.gelu(conv(self.hidden, 3, f"conv_up{stage}")(x))
    return nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_out",
                   kernel_init=conv_init(),
                   bias_init=nn.with_logical_partitioning(
                       nn.initializers.constant(self.out_bias_init), ("conv_out",)))(x)


class TaskHeads(nn.Module):
  """One head per active task. Outputs float32 (losses are computed in float32)."""
  tasks: Sequence[str]
  num_seg_classes: int
  num_det_classes: int
  hidden: int = 128
  upsample: int = 4
  dtype: tfm.Dtype = jnp.float32

  @nn.compact
  def __call__(self, grid):
    unknown = sorted(set(self.tasks) - set(HEAD_TASKS))
    if unknown:
      raise ValueError(f"model.heads.tasks: unknown {unknown}; expected a subset of {HEAD_TASKS}")
    head = lambda channels, name, bias=0.0: UpsampleHead(
        channels, self.hidden, self.upsample, bias, self.dtype, name=name)(grid).astype(jnp.float32)
    out = {}
    if "seg" in self.tasks:
      out["seg"] = head(self.num_seg_classes, "seg_head")
    if "depth" in self.tasks:
      out["depth"] = head(1, "depth_head")[..., 0]
    if "normals" in self.tasks:
      raw = head(3, "normals_head")
      out["normals"] = raw / jnp.maximum(jnp.linalg.norm(raw, axis=-1, keepdims=True), 1e-6)
    if "det" in self.tasks:
      prior = -math.log((1 - DET_HEATMAP_PRIOR) / DET_HEATMAP_PRIOR)
      out["det_heatmap"] = head(self.num_det_classes, "det_heatmap_head", prior)
      box = head(4, "det_box_head")
      out["det_size"], out["det_offset"] = box[..., :2], box[..., 2:]
    return out
