"""The text tower: OpenAI CLIP's causal transformer, pooled at the end-of-text token."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from clipzoo_jax.models import transformer as tfm


def eos_positions(tokens, eos_token_id: int | None):
  """Index of the pooled token per row: the first `eos_token_id`, or the argmax id (OpenAI, whose
  end-of-text token has the largest id) when `eos_token_id` is None."""
  if eos_token_id is None:
    return jnp.argmax(tokens, axis=-1)
  return jnp.argmax(tokens == eos_token_id, axis=-1)


class TextTower(nn.Module):
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  vocab_size: int
  context_length: int
  embed_dim: int
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int | None = None
  scan: bool = False
  remat: str = "none"
  dtype: tfm.Dtype = jnp.float32
  attention: str = "auto"
  platform: str | None = None

  @nn.compact
  def __call__(self, tokens):
    """tokens (B, L) int -> embedding (B, embed_dim)."""
    batch, length = tokens.shape
    if length != self.context_length:
      raise ValueError(f"text tower: expected token length {self.context_length}, found {length} "
                       "(model.text.context_length and the tokenizer must agree)")
    x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, name="token_embedding",
                 embedding_init=tfm.dense_init(("vocab", "embed")))(tokens)
    pos = self.param("pos_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.01), ("seq", "embed")), (self.context_length, self.width))
    x = x + pos.astype(self.dtype)
    x = tfm.Encoder(self.depth, self.num_heads, self.mlp_dim, self.activation, causal=True,
                    layer_norm_eps=self.layer_norm_eps, scan=self.scan, remat=self.remat,
                    dtype=self.dtype, attention=self.attention, platform=self.platform,
                    name="encoder")(x)
    x = tfm.LayerNorm(self.layer_norm_eps, self.dtype, name="ln_final")(x)
    pooled = x[jnp.arange(batch), eos_positions(tokens, self.eos_token_id)]
    return nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype, name="proj",
                    kernel_init=tfm.dense_init(("embed", "joint_embed")))(pooled)
