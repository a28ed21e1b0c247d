"""Forward-pass parity of our JAX model and an exported Hugging Face folder on the same random
images and token ids: embeddings, logits and (when exported) task-head outputs."""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np


def random_inputs(model_config, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Images (B, S, S, 3) ~ N(0, 1) (already normalised) and token ids (B, L), each row holding
  the pooled token (eos id, or a unique largest id for argmax pooling) at a random position."""
  rng = np.random.default_rng(seed)
  size, length = model_config.image.image_size, model_config.text.context_length
  vocab, eos = model_config.text.vocab_size, model_config.text.get("eos_token_id")
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  pooled = vocab - 1 if eos is None else eos
  tokens = rng.integers(0, vocab - 1, size=(batch, length))
  tokens[tokens == pooled] = 0
  tokens[np.arange(batch), rng.integers(1, length, size=batch)] = pooled
  return images, tokens.astype(np.int32)


def relative_error(found, expected) -> float:
  """max |found - expected| / max |expected|."""
  found, expected = np.asarray(found, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(found - expected)) / max(np.max(np.abs(expected)), 1e-30))


def jax_outputs(params: Mapping, model_config, images, tokens) -> dict[str, np.ndarray]:
  import jax  # pylint: disable=import-outside-toplevel
  from clipzoo_jax.models import clip  # pylint: disable=import-outside-toplevel
  model = clip.CLIPTeX(model_config)
  out = jax.jit(model.apply)({"params": params}, images, tokens)
  image, text = np.asarray(out["image_embedding"]), np.asarray(out["text_embedding"])
  result = {"image_embedding": image, "text_embedding": text,
            "logits_per_image": _logits(image, text, float(out["logit_scale"]))}
  result.update({f"heads/{k}": np.asarray(v) for k, v in out.get("heads", {}).items()})
  return result


def _logits(image, text, logit_scale):
  image = image / np.linalg.norm(image, axis=-1, keepdims=True)
  text = text / np.linalg.norm(text, axis=-1, keepdims=True)
  return np.exp(logit_scale) * image @ text.T


def torch_outputs(folder: str, images, tokens) -> dict[str, np.ndarray]:
  """The exported folder run by transformers' CLIPModel (and torch_heads when present)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from clipzoo_jax.convert import torch_heads  # pylint: disable=import-outside-toplevel
  model = transformers.CLIPModel.from_pretrained(folder).eval()
  pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  ids = torch.from_numpy(tokens.astype(np.int64))
  with torch.no_grad():
    out = model(input_ids=ids, pixel_values=pixels)
    result = {
        "image_embedding": model.get_image_features(pixel_values=pixels).pooler_output.numpy(),
        "text_embedding": model.get_text_features(input_ids=ids).pooler_output.numpy(),
        "logits_per_image": out.logits_per_image.numpy(),
    }
    if os.path.isfile(os.path.join(folder, torch_heads.HEADS_WEIGHTS)):
      heads = torch_heads.TaskHeads.from_pretrained(folder)
      patches = out.vision_model_output.last_hidden_state[:, 1:]
      result.update({f"heads/{k}": v.numpy() for k, v in heads(patches).items()})
  return result


def compare(params: Mapping, model_config, folder: str, batch: int = 4,
            seed: int = 0) -> dict[str, float]:
  """Relative error of every output of the exported folder against our model (fp32)."""
  images, tokens = random_inputs(model_config, batch, seed)
  ours = jax_outputs(params, model_config, images, tokens)
  theirs = torch_outputs(folder, images, tokens)
  missing = sorted(set(ours) ^ set(theirs))
  if missing:
    raise ValueError(f"{folder}: outputs present on one side only: {missing}")
  return {name: relative_error(theirs[name], ours[name]) for name in sorted(ours)}
