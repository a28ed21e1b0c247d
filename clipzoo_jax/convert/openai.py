"""OpenAI CLIP state dicts (`ViT-B-16.pt`, a TorchScript archive, or a plain state dict with the
same names): the tower shape inferred from tensor shapes, then imported through layout.py.

A state dict does not store the number of heads, the activation or the LayerNorm epsilon; those
come from the run's config (OpenAI's own models: heads = width // 64, quick_gelu, 1e-5).
"""

from __future__ import annotations

import math
import re

import ml_collections
import numpy as np

from clipzoo_jax.convert import layout
from clipzoo_jax.convert import tensor_files
from clipzoo_jax.models import variants

# Non-weight entries OpenAI's archives carry (its build_model deletes them) and attention masks.
# `logit_bias` (open_clip's SigLIP-style models, our exports of SigLIP-trained ones) is not a tower
# weight: `load` reads it apart.
IGNORED = re.compile(
    r"(^|\.)attn_mask$|^(input_resolution|context_length|vocab_size|logit_bias)$")
HF_PREFIXES = ("vision_model.", "text_model.")
OPENAI_HEAD_WIDTH = 64  # OpenAI's build_model: heads = width // 64


def _depth(names, prefix: str) -> int | None:
  pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
  layers = {int(m.group(1)) for m in map(pattern.match, names) if m}
  return max(layers) + 1 if layers else None


def found_fields(source: tensor_files.TensorSource) -> dict[str, tuple]:
  """Dotted model-config field -> (value inferred from a tensor shape, which tensor)."""
  names = set(source.names())
  found = {}

  def take(field, name, pick):
    if name in names:
      shape = tuple(source.shape(name))
      found[field] = (pick(shape), f"{name} shape {shape}")
      return shape
    return None

  conv = take("image.width", "visual.conv1.weight", lambda s: s[0])
  take("image.patch_size", "visual.conv1.weight", lambda s: s[-1])
  if conv is not None:
    take("image.image_size", "visual.positional_embedding",
         lambda s: math.isqrt(s[0] - 1) * conv[-1])
  take("image.mlp_dim", "visual.transformer.resblocks.0.mlp.c_fc.weight", lambda s: s[0])
  take("embed_dim", "visual.proj", lambda s: s[1])
  take("text.width", "ln_final.weight", lambda s: s[0])
  take("text.vocab_size", "token_embedding.weight", lambda s: s[0])
  take("text.context_length", "positional_embedding", lambda s: s[0])
  take("text.mlp_dim", "transformer.resblocks.0.mlp.c_fc.weight", lambda s: s[0])
  for field, prefix in (("image.depth", "visual.transformer.resblocks."),
                        ("text.depth", "transformer.resblocks.")):
    depth = _depth(names, prefix)
    if depth is not None:
      found[field] = (depth, f"{prefix}<i> keys")
  return found


def load(path: str, model_config, source: tensor_files.TensorSource | None = None,
         fmt: str = "openai") -> dict:
  """Our tower params from an OpenAI-named state dict file, checked against `model_config`."""
  source = source or tensor_files.read_tensor_file(path)
  if any(n.startswith(HF_PREFIXES) for n in source.names()):
    raise layout.ConversionError(f"{path}: holds Hugging Face CLIPModel names (vision_model.*); "
                                 "pass the folder with its config.json instead")
  params = layout.from_torch(source, model_config, "openai", fmt, found_fields(source), IGNORED)
  if "logit_bias" in source.names() and model_config.get("logit_bias_init") is not None:
    bias = source.get("logit_bias")
    if bias.size != 1:
      raise layout.ConversionError(f"{path}: logit_bias expected one value, found shape "
                                   f"{tuple(bias.shape)}")
    params["logit_bias"] = np.float32(bias.reshape(()))
  return params


def model_config_from_state_dict(source: tensor_files.TensorSource, tasks=(),
                                 **overrides) -> ml_collections.ConfigDict:
  """Our model config for an OpenAI-named state dict, with OpenAI's conventions for what the
  tensors do not say (heads = width // 64, quick_gelu, eps 1e-5, argmax pooling)."""
  cfg = variants.model_config("B/16", tasks=tasks, **overrides)
  cfg.variant = f"state_dict:{source.origin}"
  for field, (value, _) in found_fields(source).items():
    section, _, key = field.rpartition(".")
    (cfg[section] if section else cfg)[key] = value
  for tower in (cfg.image, cfg.text):
    tower.num_heads = max(tower.width // OPENAI_HEAD_WIDTH, 1)
  if "logit_bias" in source.names() and "logit_bias_init" not in overrides:
    cfg.logit_bias_init = float(np.asarray(source.get("logit_bias")).reshape(-1)[0])
  return cfg
