"""The pre-LN residual attention block of OpenAI CLIP and a stack of them (scan + remat optional).

Parameter names and layouts are chosen so that converting to/from OpenAI or Hugging Face CLIP is a
rename plus reshape/transpose: q/k/v/out projections as separate layers with
(embed, heads, kv) kernels, `ln_1`, `ln_2`, `mlp/fc`, `mlp/proj` as in OpenAI's ResidualAttentionBlock.
Every parameter carries logical axis names; activations carry logical constraints.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipzoo_jax import cli

Dtype = Any

# Activation logical axes: separate names from parameter axes, so a rules table can shard
# activations over the batch while parameters shard their `embed` dim over fsdp.
BATCH, SEQ, EMBED, MLP, HEADS, KV = ("activation_batch", "activation_seq", "activation_embed",
                                     "activation_mlp", "activation_heads", "activation_kv")


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable] = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def activation_fn(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise cli.UserError(f"model activation: expected one of {sorted(ACTIVATIONS)}, found {name!r}")
  return ACTIVATIONS[name]


def dense_init(names):
  return nn.with_logical_partitioning(nn.initializers.normal(0.02), names)


def zeros_init(names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def ones_init(names):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 (as OpenAI CLIP does under fp16); params `scale`, `bias`."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    scale = self.param("scale", ones_init(("norm",)), (width,))
    bias = self.param("bias", zeros_init(("norm",)), (width,))
    return layer_norm(x, scale, bias, self.epsilon).astype(self.dtype)


def _normalize(x, epsilon):
  """(x in float32, its mean, 1 / its standard deviation) over the last axis."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  return x, mean, jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, epsilon: float):
  """(x - mean) / std * scale + bias over the last axis, in float32, with the textbook backward
  pass written out: it keeps x (in its own dtype) and two float32 numbers per row, and computes
  dx = (g*scale - mean(g*scale) - xhat * mean(g*scale*xhat)) / std. XLA's derivative of the
  forward formula recomputed the row reductions inside transposing fusions on the CPU; this one
  made the issue-11 CPU step 5% faster, same values (tests/test_models.py)."""
  x, mean, rstd = _normalize(x, epsilon)
  return (x - mean) * rstd * scale + bias


def _layer_norm_forward(x, scale, bias, epsilon):
  x32, mean, rstd = _normalize(x, epsilon)
  return (x32 - mean) * rstd * scale + bias, (x, mean, rstd, scale)


def _layer_norm_backward(epsilon, residuals, grad):
  del epsilon
  x, mean, rstd, scale = residuals
  xhat = (x.astype(jnp.float32) - mean) * rstd
  g = grad.astype(jnp.float32)
  rows = tuple(range(g.ndim - 1))
  g_scaled = g * scale
  dx = rstd * (g_scaled - g_scaled.mean(-1, keepdims=True)
               - xhat * (g_scaled * xhat).mean(-1, keepdims=True))
  return (dx.astype(x.dtype), (g * xhat).sum(rows).astype(scale.dtype),
          g.sum(rows).astype(scale.dtype))


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class HeadsProjection(nn.Module):
  """(B, L, D) -> (B, L, heads, head_dim) with a full-rank (D, heads, head_dim) kernel.

  Written out rather than nn.DenseGeneral, whose flattened-kernel init conflicts with the 3-D
  logical sharding under jax.set_mesh."""
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", dense_init(("embed", "heads", "kv")),
                        (x.shape[-1], self.num_heads, self.head_dim))
    bias = self.param("bias", zeros_init(("heads", "kv")), (self.num_heads, self.head_dim))
    return jnp.einsum("bld,dhk->blhk", x, kernel.astype(self.dtype)) + bias.astype(self.dtype)


class HeadsOutput(nn.Module):
  """(B, L, heads, head_dim) -> (B, L, D) with a (heads, head_dim, D) kernel."""
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", dense_init(("heads", "kv", "embed")),
                        (x.shape[-2], x.shape[-1], self.width))
    bias = self.param("bias", zeros_init(("embed",)), (self.width,))
    return jnp.einsum("blhk,hkd->bld", x, kernel.astype(self.dtype)) + bias.astype(self.dtype)


@jax.custom_vjp
def softmax_keeping_dtype(logits):
  """Softmax over the last axis computed in float32, returned in the logits' dtype.

  The backward pass needs only the probabilities, and this keeps them in the compute dtype: with
  bfloat16 activations the saved attention probabilities take 2 bytes each instead of the 4 + 2
  of a float32 softmax followed by a cast (B x heads x L^2 per layer, the largest activation of a
  ViT without remat). In float32 it equals jax.nn.softmax."""
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)


def _softmax_forward(logits):
  probabilities = softmax_keeping_dtype(logits)
  return probabilities, probabilities


def _softmax_backward(probabilities, grad):
  y, g = probabilities.astype(jnp.float32), grad.astype(jnp.float32)
  return ((g - jnp.sum(g * y, axis=-1, keepdims=True)) * y).astype(probabilities.dtype),


softmax_keeping_dtype.defvjp(_softmax_forward, _softmax_backward)


ATTENTION_IMPLEMENTATIONS = ("auto", "heads_first", "einsum", "cudnn")


def resolve_attention(implementation: str, platform: str, dtype, head_dim: int) -> str:
  """The attention implementation that `auto` stands for on `platform` (cpu, gpu or tpu), where
  each was measured best:
  - `heads_first`: (B, heads, L, head_dim) operands make both products plain batched matmuls;
    on CPU 25% faster (forward + backward) than contracting in the (B, L, heads, head_dim)
    layout; on TPU (AOT, L/14 CLIPTeX on v4-128, full remat) 25.9 GiB per chip against 27.8
    for `einsum`.
  - `einsum`: contracts in the (B, L, heads, head_dim) layout and leaves the layout to XLA.
  - `cudnn`: jax.nn.dot_product_attention's cuDNN fused (flash) attention, which never writes
    the (L, L) probabilities; GPU only, bfloat16/float16 only, head_dim a multiple of 8 up to 128.
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise cli.UserError(f"model.attention: expected one of {list(ATTENTION_IMPLEMENTATIONS)}, "
                        f"found {implementation!r}")
  cudnn_ok = (platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
              and head_dim % 8 == 0 and head_dim <= 128)
  if implementation == "cudnn" and not cudnn_ok:
    raise cli.UserError(f"model.attention 'cudnn' needs a GPU, model.dtype bfloat16 or float16 and "
                        f"head_dim a multiple of 8 up to 128; found platform {platform!r}, dtype "
                        f"{jnp.dtype(dtype).name}, head_dim {head_dim}")
  if implementation != "auto":
    return implementation
  return "cudnn" if cudnn_ok else "heads_first"


class Attention(nn.Module):
  """Multi-head self-attention; `causal` masks future positions (the text tower).
  `implementation` is one of ATTENTION_IMPLEMENTATIONS (resolve_attention says which is best
  where); all compute the same function. `platform` resolves `auto` (default: JAX's default
  backend; an AOT check for TPU on a CPU host passes `tpu`)."""
  num_heads: int
  causal: bool = False
  dtype: Dtype = jnp.float32
  implementation: str = "auto"
  platform: str | None = None

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    if width % self.num_heads:
      raise cli.UserError(f"attention: width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    implementation = resolve_attention(self.implementation,
                                       self.platform or jax.default_backend(), self.dtype, head_dim)
    project = lambda name: HeadsProjection(self.num_heads, head_dim, self.dtype, name=name)(x)
    q, k, v = project("query"), project("key"), project("value")
    q = nn.with_logical_constraint(q, (BATCH, SEQ, HEADS, KV))
    if implementation == "cudnn":
      out = fused_attention(q, k, v, self.causal, "cudnn")
    else:
      out = _attention_xla(q * (head_dim ** -0.5), k, v, self.causal,
                           heads_first=implementation == "heads_first")
    out = nn.with_logical_constraint(out, (BATCH, SEQ, HEADS, KV))
    return HeadsOutput(width, self.dtype, name="out")(out)


def fused_attention(q, k, v, causal: bool, implementation: str, multiple: int = 8):
  """jax.nn.dot_product_attention of (B, L, heads, head_dim) operands with L padded up to a
  `multiple`: cuDNN refuses odd lengths ("Unsupported sequence length" for the ViT's 197 and the
  text's 77 with JAX 0.11 on an H200). Padded keys are masked out by their length, padded query
  rows are cut off, so the result is that of the unpadded operands. Every even multiple was
  accepted there; 8 was the fastest (forward + backward at B/16's shapes, batch 256: 1.19 ms at
  197 -> 200 against 1.30 ms padded to 256, 0.33 against 0.40 ms for the text's 77)."""
  length = q.shape[1]
  padded = -(-length // multiple) * multiple
  if padded == length:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
  pad = lambda t: jnp.pad(t, ((0, 0), (0, padded - length), (0, 0), (0, 0)))
  key_lengths = jnp.full((q.shape[0],), length, jnp.int32)
  out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), is_causal=causal,
                                     key_value_seq_lengths=key_lengths,
                                     implementation=implementation)
  return out[:, :length]


def _attention_xla(q, k, v, causal: bool, heads_first: bool):
  """softmax(q k^T) v of (B, L, heads, head_dim) operands (q already scaled), as XLA ops."""
  if heads_first:
    to_heads_first = lambda t: t.transpose(0, 2, 1, 3)
    logits = jnp.matmul(to_heads_first(q), to_heads_first(k).swapaxes(-1, -2))
  else:
    logits = jnp.einsum("blhk,bmhk->bhlm", q, k)
  if causal:
    length = q.shape[1]
    mask = jnp.tril(jnp.ones((length, length), bool))
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  weights = softmax_keeping_dtype(logits)
  if heads_first:
    return jnp.matmul(weights, v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
  return jnp.einsum("bhlm,bmhk->blhk", weights, v)


class Mlp(nn.Module):
  mlp_dim: int
  activation: str = "quick_gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc",
                 kernel_init=dense_init(("embed", "mlp")), bias_init=zeros_init(("mlp",)))(x)
    h = nn.with_logical_constraint(activation_fn(self.activation)(h), (BATCH, SEQ, MLP))
    return nn.Dense(width, dtype=self.dtype, name="proj",
                    kernel_init=dense_init(("mlp", "embed")), bias_init=zeros_init(("embed",)))(h)


class Block(nn.Module):
  """x + attn(ln_1(x)); x + mlp(ln_2(x)). Returns (x, None) so it can be the body of nn.scan."""
  num_heads: int
  mlp_dim: int
  activation: str = "quick_gelu"
  causal: bool = False
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  attention: str = "auto"
  platform: str | None = None

  @nn.compact
  def __call__(self, x, _=None):
    x = nn.with_logical_constraint(x, (BATCH, SEQ, EMBED))
    y = LayerNorm(self.layer_norm_eps, self.dtype, name="ln_1")(x)
    x = x + Attention(self.num_heads, self.causal, self.dtype, self.attention, self.platform,
                      name="attn")(y)
    y = LayerNorm(self.layer_norm_eps, self.dtype, name="ln_2")(x)
    x = x + Mlp(self.mlp_dim, self.activation, self.dtype, name="mlp")(y)
    return nn.with_logical_constraint(x, (BATCH, SEQ, EMBED)), None


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Encoder(nn.Module):
  """`depth` Blocks. Unscanned params live under `block_{i}`; scanned under `blocks` with a
  leading `layers` axis (conversion handles both layouts)."""
  depth: int
  num_heads: int
  mlp_dim: int
  activation: str = "quick_gelu"
  causal: bool = False
  layer_norm_eps: float = 1e-5
  scan: bool = False
  remat: str = "none"
  dtype: Dtype = jnp.float32
  attention: str = "auto"
  platform: str | None = None

  @nn.compact
  def __call__(self, x):
    if self.remat not in REMAT_POLICIES:
      raise cli.UserError(f"model remat: expected one of {sorted(REMAT_POLICIES)}, found {self.remat!r}")
    block_cls = Block
    if self.remat != "none":
      block_cls = nn.remat(Block, prevent_cse=not self.scan, policy=REMAT_POLICIES[self.remat])
    kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, activation=self.activation,
                  causal=self.causal, layer_norm_eps=self.layer_norm_eps, dtype=self.dtype,
                  attention=self.attention, platform=self.platform)
    if self.scan:
      stack = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(**kwargs, name="blocks")(x, None)
      return x
    for i in range(self.depth):
      x, _ = block_cls(**kwargs, name=f"block_{i}")(x, None)
    return x
