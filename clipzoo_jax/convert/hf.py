"""Hugging Face `CLIPModel` folders: import (config.json + weights) into our tower params, and
export our params as a folder that `CLIPModel` and `CLIPProcessor.from_pretrained` load as-is."""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Callable, Mapping, Sequence

import ml_collections
import numpy as np

from clipzoo_jax.convert import errors
from clipzoo_jax.convert import layout
from clipzoo_jax.convert import tensor_files
from clipzoo_jax.convert import text_pooling
from clipzoo_jax.models import variants

# our activation name <-> HF `hidden_act` (HF "gelu" is the exact erf GELU, as ours)
TO_HF_ACTIVATION = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
FROM_HF_ACTIVATION = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                      "gelu_new": "gelu_tanh"}
# HF pools text at the argmax id when text_config.eos_token_id == 2 (configs from before
# transformers PR #24773), else at the first eos_token_id: ours is None (argmax) or the id.
LEGACY_ARGMAX_EOS = 2
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
IGNORED = re.compile(r"\.position_ids$")  # buffers older transformers saved; recomputed anyway
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses safetensors without it


def read_config(folder: str):
  """The folder's `transformers.CLIPConfig` (defaults filled, legacy layouts upgraded)."""
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise layout.ConversionError(f"{folder}: not a Hugging Face CLIPModel folder (no config.json)")
  with errors.reading(path, "JSON file"), open(path, encoding="utf-8") as f:
    stated = json.load(f)
  if not isinstance(stated, dict):
    raise layout.ConversionError(f"{path}: expected a JSON object (a CLIPModel config), found "
                                 f"{type(stated).__name__}")
  if stated.get("model_type") != "clip":
    raise layout.ConversionError(f"{path}: model_type expected 'clip' (CLIPModel), found "
                                 f"{stated.get('model_type')!r}")
  import transformers  # pylint: disable=import-outside-toplevel
  with errors.reading(path, "CLIPModel config", hint="transformers.CLIPConfig refused it"):
    return transformers.CLIPConfig.from_pretrained(folder)


def _square(value, where: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise layout.ConversionError(f"{where}: only square sizes are supported, found {value}")
    value = value[0]
  return int(value)


def _unsupported(hf_config, folder: str) -> list[str]:
  """What the folder states that our towers cannot be: each names the config.json field."""
  problems = []
  for section in ("vision_config", "text_config"):
    act = getattr(hf_config, section).hidden_act
    if act not in FROM_HF_ACTIVATION:
      problems.append(f"{section}.hidden_act: expected one of {sorted(FROM_HF_ACTIVATION)} (the "
                      f"activations model.image/text.activation implement), found {act!r}")
  channels = getattr(hf_config.vision_config, "num_channels", 3)
  if channels != 3:
    problems.append(f"vision_config.num_channels: expected 3 (RGB), found {channels!r}")
  return [f"{os.path.join(folder, 'config.json')} {p}" for p in problems]


def found_fields(hf_config, folder: str = "") -> dict[str, tuple]:
  """Dotted model-config field -> (value the HF config states, where it says it). Refuses what our
  towers cannot be (activation, channels) and an end-of-text id that cannot work with the
  vocabulary or with the folder's tokenizer (when it has one)."""
  problems = _unsupported(hf_config, folder)
  if problems:
    raise layout.ConversionError("cannot import this Hugging Face CLIPModel:\n  " +
                                 "\n  ".join(problems))
  vision, text = hf_config.vision_config, hf_config.text_config
  found = {"embed_dim": (hf_config.projection_dim, "config.json projection_dim")}
  for ours, section, cfg in (("image", "vision_config", vision), ("text", "text_config", text)):
    where = lambda key, s=section: f"config.json {s}.{key}"
    found[f"{ours}.width"] = (cfg.hidden_size, where("hidden_size"))
    found[f"{ours}.depth"] = (cfg.num_hidden_layers, where("num_hidden_layers"))
    found[f"{ours}.num_heads"] = (cfg.num_attention_heads, where("num_attention_heads"))
    found[f"{ours}.mlp_dim"] = (cfg.intermediate_size, where("intermediate_size"))
    found[f"{ours}.activation"] = (FROM_HF_ACTIVATION[cfg.hidden_act], where("hidden_act"))
    found[f"{ours}.layer_norm_eps"] = (float(cfg.layer_norm_eps), where("layer_norm_eps"))
  found["image.patch_size"] = (_square(vision.patch_size, "vision_config.patch_size"),
                               "config.json vision_config.patch_size")
  found["image.image_size"] = (_square(vision.image_size, "vision_config.image_size"),
                               "config.json vision_config.image_size")
  found["text.vocab_size"] = (text.vocab_size, "config.json text_config.vocab_size")
  found["text.context_length"] = (text.max_position_embeddings,
                                  "config.json text_config.max_position_embeddings")
  eos = text.eos_token_id
  if isinstance(eos, (list, tuple)):
    raise layout.ConversionError(
        f"config.json text_config.eos_token_id: expected one id, found {eos}")
  eos = None if eos == LEGACY_ARGMAX_EOS else eos
  tokenizer = text_pooling.read_tokenizer_ids(folder) if folder else None
  text_pooling.check_eos(eos, text.vocab_size, f"{os.path.join(folder, 'config.json')} "
                         "text_config.eos_token_id", tokenizer, argmax_value=str(LEGACY_ARGMAX_EOS))
  found["text.eos_token_id"] = (eos, "config.json text_config.eos_token_id; 2 means argmax "
                                "pooling")
  return found


def model_config_from_hf(folder: str, tasks: Sequence[str] = (),
                         **overrides) -> ml_collections.ConfigDict:
  """Our model config with the towers exactly as the folder's config.json states them."""
  fields = {k: v for k, (v, _) in found_fields(read_config(folder), folder).items()}
  cfg = variants.model_config("B/16", tasks=tasks, **overrides)
  cfg.variant = f"hf:{os.path.basename(os.path.normpath(folder))}"
  for field, value in fields.items():
    section, _, key = field.rpartition(".")
    (cfg[section] if section else cfg)[key] = value
  bias = logit_bias(folder)
  if bias is not None and "logit_bias_init" not in overrides:
    cfg.logit_bias_init = bias  # trained with SigLIP's loss: the model has the bias
  return cfg


def weights_source(folder: str) -> tensor_files.TensorSource:
  for name in WEIGHT_FILES:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return tensor_files.read_tensor_file(path)
  raise layout.ConversionError(f"{folder}: no weights; expected one of {list(WEIGHT_FILES)}, "
                               f"found {sorted(os.listdir(folder))}")


def load(folder: str, model_config) -> dict:
  """Our tower params from an HF CLIPModel folder, checked against `model_config`; with
  `logit_bias` too when the model has one (model.logit_bias_init set) and config.json states it."""
  found = found_fields(read_config(folder), folder)
  params = layout.from_torch(weights_source(folder), model_config, "hf",
                             "a Hugging Face CLIPModel", found, IGNORED)
  bias = logit_bias(folder)
  if bias is not None and model_config.get("logit_bias_init") is not None:
    params["logit_bias"] = np.float32(bias)
  return params


# ---------------------------------------------------------------------------------------------
# Export


def hf_config(model_config, logit_scale: float, bos_token_id: int | None = None,
              pad_token_id: int | None = None, logit_bias: float | None = None):
  """The `transformers.CLIPConfig` of our towers; text pooling set to pool where ours does.
  `logit_bias` (a SigLIP-trained model's learned bias) is kept as the config's `logit_bias`:
  CLIPModel has no such parameter, and its logits_per_image leave it out."""
  import transformers  # pylint: disable=import-outside-toplevel
  img, txt, embed = model_config.image, model_config.text, model_config.embed_dim
  eos = txt.get("eos_token_id")
  if eos == LEGACY_ARGMAX_EOS:
    raise layout.ConversionError(
        f"model.text.eos_token_id = {eos} cannot be exported: Hugging Face reads eos_token_id 2 as "
        "'pool at the argmax id' (legacy CLIP configs), not 'pool at the first id 2'")
  text_pooling.check_eos(eos, txt.vocab_size, "model.text.eos_token_id")
  for tower, cfg in (("image", img), ("text", txt)):
    if cfg.activation not in TO_HF_ACTIVATION:
      raise layout.ConversionError(f"model.{tower}.activation: expected one of "
                                   f"{sorted(TO_HF_ACTIVATION)}, found {cfg.activation!r}")
  text_config = dict(
      vocab_size=txt.vocab_size, hidden_size=txt.width, intermediate_size=txt.mlp_dim,
      projection_dim=embed, num_hidden_layers=txt.depth, num_attention_heads=txt.num_heads,
      max_position_embeddings=txt.context_length, hidden_act=TO_HF_ACTIVATION[txt.activation],
      layer_norm_eps=txt.layer_norm_eps, eos_token_id=LEGACY_ARGMAX_EOS if eos is None else eos)
  # Unused by CLIPModel's forward; ids outside the vocabulary only draw warnings, so drop them.
  in_vocab = lambda i: i if i is not None and 0 <= i < txt.vocab_size else None
  text_config.update(bos_token_id=in_vocab(bos_token_id), pad_token_id=in_vocab(pad_token_id))
  vision_config = dict(
      hidden_size=img.width, intermediate_size=img.mlp_dim, projection_dim=embed,
      num_hidden_layers=img.depth, num_attention_heads=img.num_heads, image_size=img.image_size,
      patch_size=img.patch_size, hidden_act=TO_HF_ACTIVATION[img.activation],
      layer_norm_eps=img.layer_norm_eps)
  config = transformers.CLIPConfig(text_config=text_config, vision_config=vision_config,
                                   projection_dim=embed, logit_scale_init_value=float(logit_scale))
  config.architectures = ["CLIPModel"]
  if logit_bias is not None:
    config.logit_bias = float(logit_bias)
  return config


def logit_bias(folder: str) -> float | None:
  """The `logit_bias` an export of a SigLIP-trained model wrote into config.json, if any."""
  value = getattr(read_config(folder), "logit_bias", None)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise layout.ConversionError(f"{os.path.join(folder, 'config.json')}: logit_bias expected a "
                                 f"number, found {value!r}")
  return float(value)


def preprocessor_config(image_size: int, image_mean: Sequence[float],
                        image_std: Sequence[float]) -> dict:
  """CLIPImageProcessor settings: resize the short side, centre-crop, normalise as in training."""
  return {
      "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
      "do_resize": True, "size": {"shortest_edge": image_size}, "resample": 3,  # bicubic
      "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
      "do_rescale": True, "rescale_factor": 1 / 255, "do_convert_rgb": True,
      "do_normalize": True, "image_mean": list(image_mean), "image_std": list(image_std),
  }


def copy_tokenizer(tokenizer_dir: str, out_dir: str, context_length: int) -> dict[str, int]:
  """Copies the tokenizer files; `model_max_length` becomes the exported context length. Returns
  the ids of the special tokens (for config.json)."""
  from clipzoo_jax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, n))]
  if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= set(names):
    raise layout.ConversionError(f"{tokenizer_dir}: expected tokenizer.json or vocab.json + "
                                 f"merges.txt, found {names}")
  for name in names:
    shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
  config_path = os.path.join(out_dir, "tokenizer_config.json")
  tokenizer_config = {"tokenizer_class": "CLIPTokenizer"}
  if os.path.isfile(config_path):
    with open(config_path) as f:
      tokenizer_config = json.load(f)
  tokenizer_config["model_max_length"] = context_length
  with open(config_path, "w") as f:
    json.dump(tokenizer_config, f, indent=2)
  vocab, _, _ = tokenizer_lib.read_vocab_and_merges(tokenizer_dir)
  return {"bos_token_id": vocab.get(tokenizer_lib.SOT),
          "pad_token_id": vocab.get(tokenizer_lib.EOT)}


def export(params: Mapping, model_config, out_dir: str, image_mean: Sequence[float],
           image_std: Sequence[float], tokenizer_dir: str | None = None,
           host: Callable = np.asarray, logit_bias: float | None = None) -> list[str]:
  """Writes config.json, model.safetensors (streamed leaf by leaf), preprocessor_config.json and,
  with `tokenizer_dir`, the tokenizer files. `params` holds `img`, `txt`, `logit_scale`;
  `logit_bias` goes into config.json (`hf_config`)."""
  if tokenizer_dir:  # what HF users will tokenize with must end text where the model pools
    tokenizer = text_pooling.read_tokenizer_ids(tokenizer_dir)
    text_pooling.check_eos(model_config.text.get("eos_token_id"), model_config.text.vocab_size,
                           "model.text.eos_token_id", tokenizer)
  os.makedirs(out_dir, exist_ok=True)
  special = (copy_tokenizer(tokenizer_dir, out_dir, model_config.text.context_length)
             if tokenizer_dir else {})
  logit_scale = float(host(params["logit_scale"]))
  hf_config(model_config, logit_scale, logit_bias=logit_bias, **special).save_pretrained(out_dir)
  with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
    json.dump(preprocessor_config(model_config.image.image_size, image_mean, image_std), f,
              indent=2)
  entries = layout.plan(model_config, "hf")
  weights = os.path.join(out_dir, "model.safetensors")
  with tensor_files.SafetensorsWriter(weights, layout.torch_shapes(entries),
                                      SAFETENSORS_METADATA) as writer:
    layout.to_torch(params, model_config, "hf", writer.write, host)
  return sorted(os.listdir(out_dir))
