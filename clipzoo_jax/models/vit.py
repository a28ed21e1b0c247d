"""The image tower: OpenAI CLIP's ViT (conv patch embedding without bias, class token, learned
position embedding, ln_pre, pre-LN blocks, ln_post on the class token, projection without bias)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from clipzoo_jax.models import transformer as tfm


class PatchEmbedding(nn.Module):
  """(B, S, S, C) images -> (B, S/p, S/p, width): a p x p stride-p convolution without bias, with
  nn.Conv's parameter (`kernel` (p, p, C, width)), computed as one matmul over the flattened
  patches. XLA:CPU ran the convolution's kernel gradient as a dilated convolution 2-3x slower
  than this product (70 against ~25 ms per step at issue 11's shape)."""
  width: int
  patch_size: int
  dtype: tfm.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    batch, height, width_px, channels = images.shape
    kernel = self.param("kernel", tfm.dense_init(("conv_height", "conv_width", "conv_in", "embed")),
                        (p, p, channels, self.width))
    rows, cols = height // p, width_px // p
    patches = images[:, :rows * p, :cols * p].reshape(batch, rows, p, cols, p, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows, cols, p * p * channels)
    return patches.astype(self.dtype) @ kernel.reshape(p * p * channels, self.width).astype(
        self.dtype)


class ImageTower(nn.Module):
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  image_size: int
  embed_dim: int
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  scan: bool = False
  remat: str = "none"
  dtype: tfm.Dtype = jnp.float32
  attention: str = "auto"
  platform: str | None = None

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @nn.compact
  def __call__(self, images):
    """images (B, S, S, 3) -> (embedding (B, embed_dim), patch tokens (B, g, g, width)).

    Patch tokens are the encoder's output before `ln_post`, i.e. exactly Hugging Face
    CLIPVisionModel's `last_hidden_state[:, 1:]`, so exported heads run on that directly.
    """
    batch, height, width_px, _ = images.shape
    if height != self.image_size or width_px != self.image_size:
      raise ValueError(f"image tower: expected {self.image_size}x{self.image_size} images, found "
                       f"{height}x{width_px} (set model.image.image_size or data.image_size)")
    x = PatchEmbedding(self.width, self.patch_size, self.dtype, name="embedding")(images)
    grid = x.shape[1]
    x = x.reshape(batch, grid * grid, self.width)
    scale = self.width ** -0.5
    cls = self.param("cls_token", nn.with_logical_partitioning(
        nn.initializers.normal(scale), ("embed",)), (self.width,))
    pos = self.param("pos_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(scale), ("seq", "embed")), (grid * grid + 1, self.width))
    cls = jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)
    x = tfm.LayerNorm(self.layer_norm_eps, self.dtype, name="ln_pre")(x)
    x = tfm.Encoder(self.depth, self.num_heads, self.mlp_dim, self.activation, causal=False,
                    layer_norm_eps=self.layer_norm_eps, scan=self.scan, remat=self.remat,
                    dtype=self.dtype, attention=self.attention, platform=self.platform,
                    name="encoder")(x)
    patches = x[:, 1:].reshape(batch, grid, grid, self.width)
    pooled = tfm.LayerNorm(self.layer_norm_eps, self.dtype, name="ln_post")(x[:, 0])
    embedding = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype, name="proj",
                         kernel_init=tfm.dense_init(("embed", "joint_embed")))(pooled)
    return embedding, patches
