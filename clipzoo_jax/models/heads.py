"""Light dense task heads on the image tower's patch-token grid: LayerNorm, a 3x3 conv, then x2
upsample + 3x3 conv stages. Which heads exist and how their channels split into named outputs
is data (`clipzoo_jax.tasks.HeadSpec`), shared with the PyTorch heads."""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipzoo_jax import cli
from clipzoo_jax.models import transformer as tfm
from clipzoo_jax.tasks import HeadSpec


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
      raise cli.UserError(f"model.heads.upsample must be a power of 2, found {self.upsample}")
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


def slice_outputs(raw, spec) -> dict:
  """The named outputs of one head's raw channels (B, H, W, C), as its HeadSpec cuts them."""
  out = {}
  for output in spec.outputs:
    value = raw[..., output.start] if output.stop is None else raw[..., output.start:output.stop]
    if output.unit_norm:
      value = value / jnp.maximum(jnp.linalg.norm(value, axis=-1, keepdims=True), 1e-6)
    out[output.name] = value
  return out


class TaskHeads(nn.Module):
  """One UpsampleHead per HeadSpec (`clipzoo_jax.tasks.head_specs`), named as the spec says.
  Outputs float32 (losses are computed in float32)."""
  specs: Sequence[HeadSpec]
  hidden: int = 128
  upsample: int = 4
  dtype: tfm.Dtype = jnp.float32

  @nn.compact
  def __call__(self, grid):
    out = {}
    for spec in self.specs:
      raw = UpsampleHead(spec.channels, self.hidden, self.upsample, spec.bias_init, self.dtype,
                         name=spec.name)(grid).astype(jnp.float32)
      out.update(slice_outputs(raw, spec))
    return out
