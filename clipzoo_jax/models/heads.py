"""Light dense task heads on the image tower's patch-token grid, one stack per HeadSpec:
LayerNorm, a 3x3 conv to `hidden` channels, then x2 bilinear upsample + 3x3 conv stages, then a
1x1 conv to the head's channels. Which heads exist and how their channels split into named
outputs is data (`clipzoo_jax.tasks.HeadSpec`), shared with the PyTorch heads
(`convert/torch_heads.py`).

Their cost is set by `hidden` (config.model.heads.hidden): the upsampling convs cost 9 hidden^2
per output pixel, most of it at the label resolution, once per head stack (five for the four
tasks: detection has two). The default, min(32, width), keeps them at 10% of the train step's
FLOPs at issue 11's 41M-parameter reference shape (S/16 towers of depth 6, 224 px, 56 px labels,
batch 32) and 2% at B/16; 64 wide they cost 31% and 6% (tests/test_heads.py). A shared trunk
with per-task 1x1 outputs, 1x1 or pixel-shuffle upsampling and a 1x1 projection neck were cheaper
still, but each raised the demo's task losses by 5-50%: the demo's heads hold most of its
capacity. Two ops are written for XLA's CPU backend, same math: bilinear x2 as a stencil and the
1x1 output conv as one matmul.
"""

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


def upsample2x(x):
  """(B, H, W, C) -> (B, 2H, 2W, C) bilinear, half-pixel centres, edges clamped: what
  jax.image.resize(..., "bilinear") and torch's interpolate(align_corners=False) give for an exact
  x2, as a 2-tap stencil per axis (elementwise, fused) instead of dense resize matrices."""
  for axis in (1, 2):
    size = x.shape[axis]
    part = lambda start, stop: jax.lax.slice_in_dim(x, start, stop, axis=axis)
    before = jnp.concatenate([part(0, 1), part(0, size - 1)], axis)  # x[i-1], x[-1] = x[0]
    after = jnp.concatenate([part(1, size), part(size - 1, size)], axis)  # x[i+1], clamped
    pair = jnp.stack([0.75 * x + 0.25 * before, 0.75 * x + 0.25 * after], axis + 1)
    x = pair.reshape(x.shape[:axis] + (2 * size,) + x.shape[axis + 1:])
  return x


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
      x = jax.nn.gelu(conv(self.hidden, 3, f"conv_up{stage}")(upsample2x(x)))
    return PointwiseConv(self.out_channels, self.out_bias_init, self.dtype, name="conv_out")(x)


class PointwiseConv(nn.Module):
  """A 1x1 conv, parameters as nn.Conv's (`kernel` (1, 1, in, out), `bias`), computed as one
  matmul over all pixels: XLA's CPU convolution runs a 1x1 conv to 150 classes ~4x slower."""
  features: int
  bias_init: float = 0.0
  dtype: tfm.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", conv_init(), (1, 1, x.shape[-1], self.features))
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.constant(self.bias_init), ("conv_out",)), (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = x.reshape(-1, x.shape[-1]) @ kernel[0, 0] + bias
    return y.reshape(x.shape[:-1] + (self.features,))


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
  hidden: int = 32
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
