"""Named tower shapes (`Ti/16`, `S/16`, `B/16`, `B/32`, `L/14`, `L/14@336`) as model configs.

Image tower widths follow ViT; text towers and joint embedding widths follow OpenAI CLIP
(B: text 512 wide / 8 heads, embed 512; L: text 768 / 12 heads, embed 768).
"""

from __future__ import annotations

import math
import re

import ml_collections

from clipzoo_jax import cli

# size: (image width, image depth, image heads, text width, text heads, embed dim)
SIZES = {
    "mu": (64, 2, 2, 64, 2, 64),      # CPU demo and tests
    "Ti": (192, 12, 3, 256, 4, 256),
    "S": (384, 12, 6, 384, 6, 384),
    "B": (768, 12, 12, 512, 8, 512),
    "L": (1024, 24, 16, 768, 12, 768),
}
TEXT_DEPTH = 12


def parse_variant(variant: str) -> tuple[str, int, int | None]:
  """'L/14@336' -> ('L', 14, 336); 'B/16' -> ('B', 16, None)."""
  match = re.fullmatch(r"(\w+)/(\d+)(?:@(\d+))?", variant)
  if not match or match.group(1) not in SIZES:
    raise cli.UserError(f"model variant: expected SIZE/PATCH[@RES] with SIZE in {sorted(SIZES)}, "
                     f"found {variant!r}")
  return match.group(1), int(match.group(2)), int(match.group(3)) if match.group(3) else None


def model_config(variant: str = "B/16", image_size: int = 224, tasks=(),
                 num_seg_classes: int = 150, num_det_classes: int = 80,
                 vocab_size: int = 49408, context_length: int = 77,
                 text_depth: int | None = None) -> ml_collections.ConfigDict:
  size, patch, resolution = parse_variant(variant)
  image_width, image_depth, image_heads, text_width, text_heads, embed_dim = SIZES[size]
  if size == "mu":
    text_depth = text_depth or image_depth
  cfg = ml_collections.ConfigDict()
  cfg.variant = variant
  cfg.embed_dim = embed_dim
  cfg.dtype = "float32"  # matmul/activation dtype; parameters are always float32
  cfg.scan_layers = False
  # the learned log temperature starts at log(1/0.07) (CLIP); SigLIP: log 10 with a learned
  # logit bias starting at -10 (config.loss.contrastive='sigmoid')
  cfg.logit_scale_init = math.log(1 / 0.07)
  cfg.logit_bias_init = ml_collections.FieldReference(None, field_type=float)
  cfg.remat = "none"
  # attention implementation (models/transformer.py resolve_attention): 'auto' picks per platform
  # (gpu + bf16: cudnn; elsewhere heads_first); all compute the same function
  cfg.attention = "auto"
  cfg.image = ml_collections.ConfigDict(dict(
      width=image_width, depth=image_depth, num_heads=image_heads, mlp_dim=4 * image_width,
      patch_size=patch, image_size=resolution or image_size, activation="quick_gelu",
      layer_norm_eps=1e-5))
  cfg.text = ml_collections.ConfigDict(dict(
      width=text_width, depth=text_depth or TEXT_DEPTH, num_heads=text_heads,
      mlp_dim=4 * text_width, vocab_size=vocab_size, context_length=context_length,
      activation="quick_gelu", layer_norm_eps=1e-5,
      eos_token_id=ml_collections.FieldReference(None, field_type=int)))
  cfg.heads = ml_collections.ConfigDict(dict(
      tasks=list(tasks), num_seg_classes=num_seg_classes, num_det_classes=num_det_classes,
      hidden=min(32, image_width), upsample=4,
      final_upsample="auto"))  # light: models/heads.py says why
  return cfg
