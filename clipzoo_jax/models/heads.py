"""Light dense task heads on the image tower's patch-token grid, one stack per HeadSpec:
LayerNorm, a 3x3 conv to `hidden` channels, then one 3x3 conv per x2 bilinear upsampling stage,
then a 1x1 conv to the head's channels. Which heads exist and how their channels split into named
outputs is data (`clipzoo_jax.tasks.HeadSpec`), shared with the PyTorch heads
(`convert/torch_heads.py`).

Each head's `final_upsample` (its HeadSpec's, or config.model.heads.final_upsample for all)
places its last stage's conv: `conv` after the stage's x2, at the label resolution; `bilinear`
before it, so that the output is a bilinear x2 of features a stage coarser. A 3x3 conv costs
9 hidden^2 per pixel it outputs, so at the label size (56 px at issue 11's 41M-parameter
reference shape: S/16 towers of depth 6, 224 px, batch 32) it costs 4x one a stage earlier,
once per head stack (five for the four tasks: detection has two). By default ("auto") the
outputs with sharp edges (seg's class map, the det heatmap's one-pixel peaks) keep `conv` and
the smooth ones (depth, normals, box size and offset) use `bilinear`: on the demo (4 seeds),
`bilinear` everywhere raised the seg loss 2.6% and det 0.8% and lowered depth and normals 1.6%
and 1.9%. With hidden = min(32, width) the heads are 7.5% of the train step's FLOPs at the
reference shape and 1.6% at B/16 (all `conv`: 9.6% and 2.0%; tests/test_heads.py).
A shared trunk with per-task 1x1 outputs, 1x1 or pixel-shuffle upsampling, a 1x1 projection neck, a
1x1 stem before a 3x3 conv, and a 1x1 conv after a bilinear last stage were cheaper still, but each
raised the demo's task losses by 5-50%: the demo's heads hold most of its capacity. Three ops are
computed differently from the textbook, same math: bilinear x2 as a stencil and the 1x1 output conv
as one matmul (both for XLA's CPU backend), and the heads' first LayerNorm + 3x3 conv as one
convolution for all heads (`stems`: 3% off the issue-11 CPU step; on accelerators one D -> 160
product instead of five D -> 32 ones).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipzoo_jax import cli
from clipzoo_jax.models import transformer as tfm
from clipzoo_jax.tasks import FINAL_UPSAMPLE, HeadSpec


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


class _LayerNormParams(nn.Module):
  """A LayerNorm's parameters (`scale`, `bias`, as tfm.LayerNorm names them), not applied."""

  @nn.compact
  def __call__(self, width: int):
    return (self.param("scale", tfm.ones_init(("norm",)), (width,)),
            self.param("bias", tfm.zeros_init(("norm",)), (width,)))


class _ConvParams(nn.Module):
  """A conv's parameters (`kernel` (size, size, in, out), `bias`, as nn.Conv names them)."""
  features: int
  size: int

  @nn.compact
  def __call__(self, in_features: int):
    return (self.param("kernel", conv_init(), (self.size, self.size, in_features, self.features)),
            self.param("bias", tfm.zeros_init(("conv_out",)), (self.features,)))


def _conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def stems(grid, params, dtype) -> list:
  """conv_in(LayerNorm_h(grid)) of every head h, as one convolution: the heads normalize the
  same grid and differ only in their LayerNorm's scale and bias, so each scale folds into its
  head's conv kernel (per input channel) and each bias becomes a constant image, whose zero-padded
  convolution is a small map that differs only at the border. `params`: per head (ln scale,
  ln bias, conv_in kernel, conv_in bias). Same function as separate stems: one (D -> heads x
  hidden) convolution instead of one per head, and one LayerNorm's statistics."""
  width = grid.shape[-1]
  normalized = tfm.layer_norm(grid, jnp.ones((width,)), jnp.zeros((width,)), 1e-5)
  kernels = jnp.concatenate([k * s[None, None, :, None] for s, _, k, _ in params], -1)
  y = _conv(normalized.astype(dtype), kernels.astype(dtype))
  bias_kernels = jnp.concatenate(
      [jnp.einsum("hwio,i->hwo", k, b)[:, :, None, :] for _, b, k, _ in params], -1)
  inside = jnp.ones((1,) + grid.shape[1:3] + (1,), dtype)
  biases = jnp.concatenate([c for *_, c in params])
  y = y + (_conv(inside, bias_kernels.astype(dtype)) + biases.astype(dtype))
  return jnp.split(y, len(params), axis=-1)


class UpsampleHead(nn.Module):
  """Patch grid (B, g, g, D) -> (B, g*upsample, g*upsample, out_channels): LayerNorm, 3x3 conv
  (`ln`, `conv_in`: the stem), then the trunk. TaskHeads computes the stems of all its heads at
  once (`stems`) and runs each head's trunk."""
  out_channels: int
  hidden: int
  upsample: int
  out_bias_init: float = 0.0
  dtype: tfm.Dtype = jnp.float32
  final_upsample: str = "conv"  # tasks.FINAL_UPSAMPLE

  def setup(self):
    if self.final_upsample not in FINAL_UPSAMPLE:
      raise cli.UserError(f"heads: final_upsample expected one of {list(FINAL_UPSAMPLE)}, "
                          f"found {self.final_upsample!r}")
    stages = int(round(math.log2(self.upsample)))
    if 2 ** stages != self.upsample:
      raise cli.UserError(f"model.heads.upsample must be a power of 2, found {self.upsample}")
    self.ln = _LayerNormParams(name="ln")
    self.conv_in = _ConvParams(self.hidden, 3, name="conv_in")
    self.conv_up = [nn.Conv(self.hidden, (3, 3), dtype=self.dtype, name=f"conv_up{stage}",
                            kernel_init=conv_init(), bias_init=tfm.zeros_init(("conv_out",)))
                    for stage in range(stages)]
    self.conv_out = PointwiseConv(self.out_channels, self.out_bias_init, self.dtype,
                                  name="conv_out")

  def stem_params(self, width: int):
    """(ln scale, ln bias, conv_in kernel, conv_in bias) for a `width`-channel grid."""
    return (*self.ln(width), *self.conv_in(width))

  def trunk(self, x):
    """The stem's output (B, g, g, hidden) -> the head's raw output channels."""
    x = jax.nn.gelu(x)
    for stage, conv in enumerate(self.conv_up):
      if self.final_upsample == "bilinear" and stage == len(self.conv_up) - 1:
        # conv_out(x2(features)) computed as x2(conv_out(features)): both are linear per pixel
        # and the x2's weights sum to 1, so the 1x1 conv runs at a quarter of the pixels and
        # only the head's few output channels are upsampled
        return upsample2x(self.conv_out(jax.nn.gelu(conv(x))))
      x = jax.nn.gelu(conv(upsample2x(x)))
    return self.conv_out(x)

  def __call__(self, grid):
    return self.trunk(stems(grid, [self.stem_params(grid.shape[-1])], self.dtype)[0])


class PointwiseConv(nn.Module):
  """A 1x1 conv, parameters as nn.Conv's (`kernel` (1, 1, in, out), `bias`), computed as one
  matmul over all pixels with the bias as one more input row ([x, 1] @ [kernel; bias]): XLA's CPU
  convolution runs a 1x1 conv to 150 classes ~4x slower, and a separate bias add is one more
  pass over the (B, H, W, 150) logits (60-90 ms of the issue-11 CPU step's heads)."""
  features: int
  bias_init: float = 0.0
  dtype: tfm.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", conv_init(), (1, 1, x.shape[-1], self.features))
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.constant(self.bias_init), ("conv_out",)), (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    pixels = x.reshape(-1, x.shape[-1])
    pixels = jnp.concatenate([pixels, jnp.ones((pixels.shape[0], 1), pixels.dtype)], -1)
    y = pixels @ jnp.concatenate([kernel[0, 0], bias[None]], 0)
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
    heads = [UpsampleHead(spec.channels, self.hidden, self.upsample, spec.bias_init, self.dtype,
                          spec.final_upsample, name=spec.name) for spec in self.specs]
    starts = stems(grid, [head.stem_params(grid.shape[-1]) for head in heads], self.dtype)
    out = {}
    for spec, head, start in zip(self.specs, heads, starts):
      out.update(slice_outputs(head.trunk(start).astype(jnp.float32), spec))
    return out
