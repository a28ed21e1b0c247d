"""CLIPTeX: the two CLIP towers, a learned temperature and the dense task heads."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from clipzoo_jax import cli
from clipzoo_jax import tasks as task_lib
from clipzoo_jax.data.normalization import CLIP_MEAN, CLIP_STD
from clipzoo_jax.models import heads as heads_lib
from clipzoo_jax.models import text as text_lib
from clipzoo_jax.models import vit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str):
  if name not in DTYPES:
    raise cli.UserError(f"model.dtype: expected one of {sorted(DTYPES)}, found {name!r}")
  return DTYPES[name]


def task_heads(cfg, dtype=jnp.float32) -> heads_lib.TaskHeads | None:
  """The dense heads a model config asks for (None without tasks)."""
  specs = task_lib.head_specs(tuple(cfg.heads.tasks), cfg)
  return heads_lib.TaskHeads(specs=specs, hidden=cfg.heads.hidden, upsample=cfg.heads.upsample,
                             dtype=dtype) if specs else None


def normalize_pixels(images):
  """uint8 RGB pixels (the loader's batches travel to the device as uint8: a quarter of the bytes
  of float32) to CLIP-normalized float32; float images are taken as already normalized."""
  if images.dtype != jnp.uint8:
    return images
  mean = jnp.asarray(CLIP_MEAN, jnp.float32) * 255.0
  inverse_std = 1.0 / (jnp.asarray(CLIP_STD, jnp.float32) * 255.0)
  return (images.astype(jnp.float32) - mean) * inverse_std


class CLIPTeX(nn.Module):
  """Parameters: `img` (image tower), `txt` (text tower), `logit_scale`, `logit_bias` (SigLIP
  loss only), `heads/...`. `platform` (cpu, gpu, tpu) picks the attention implementation that
  config.attention 'auto' stands for; default: JAX's default backend."""
  config: ml_collections.ConfigDict
  platform: str | None = None

  def setup(self):
    cfg = self.config
    dtype = compute_dtype(cfg.dtype)
    self.img = vit.ImageTower(
        width=cfg.image.width, depth=cfg.image.depth, num_heads=cfg.image.num_heads,
        mlp_dim=cfg.image.mlp_dim, patch_size=cfg.image.patch_size,
        image_size=cfg.image.image_size, embed_dim=cfg.embed_dim,
        activation=cfg.image.activation, layer_norm_eps=cfg.image.layer_norm_eps,
        scan=cfg.scan_layers, remat=cfg.remat, dtype=dtype,
        attention=cfg.get("attention", "auto"), platform=self.platform)
    self.txt = text_lib.TextTower(
        width=cfg.text.width, depth=cfg.text.depth, num_heads=cfg.text.num_heads,
        mlp_dim=cfg.text.mlp_dim, vocab_size=cfg.text.vocab_size,
        context_length=cfg.text.context_length, embed_dim=cfg.embed_dim,
        activation=cfg.text.activation, layer_norm_eps=cfg.text.layer_norm_eps,
        eos_token_id=cfg.text.get("eos_token_id"), scan=cfg.scan_layers, remat=cfg.remat,
        dtype=dtype, attention=cfg.get("attention", "auto"), platform=self.platform)
    self.logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(cfg.get("logit_scale_init", math.log(1 / 0.07))), ()), ())
    # SigLIP's learned bias of the pair logits (config.loss.contrastive='sigmoid'); absent in CLIP
    self.logit_bias = None if cfg.get("logit_bias_init") is None else self.param(
        "logit_bias", nn.with_logical_partitioning(
            nn.initializers.constant(cfg.logit_bias_init), ()), ())
    self.heads = task_heads(cfg, dtype)

  def encode_image(self, images):
    """-> (unnormalized embedding (B, E), patch tokens (B, g, g, D))."""
    return self.img(normalize_pixels(images))

  def encode_text(self, tokens):
    return self.txt(tokens)

  def __call__(self, images, tokens):
    image_embedding, patches = self.img(normalize_pixels(images))
    out = {
        "image_embedding": image_embedding.astype(jnp.float32),
        "text_embedding": self.txt(tokens).astype(jnp.float32),
        "logit_scale": self.logit_scale,
    }
    if self.logit_bias is not None:
      out["logit_bias"] = self.logit_bias
    if self.heads is not None:
      out["heads"] = self.heads(patches)
    return out
