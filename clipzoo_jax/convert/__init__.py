"""PyTorch interop: start a run from a pre-trained CLIP (HF folder, OpenAI or open_clip state dict)
and hand a trained model back (HF CLIPModel folder + task heads, optionally open_clip)."""

from __future__ import annotations

import os
import shutil
from typing import Callable, Mapping, Sequence

import numpy as np

from clipzoo_jax.convert import hf
from clipzoo_jax.convert import open_clip
from clipzoo_jax.convert import openai
from clipzoo_jax.convert import tensor_files
from clipzoo_jax.convert import text_pooling
from clipzoo_jax.convert.layout import ConversionError

FORMATS = ("auto", "hf", "openai", "open_clip")


def detect_format(source: str) -> str:
  """'hf' for a folder, 'openai' for a TorchScript archive, else 'open_clip' (whose reader also
  takes plain OpenAI state dicts: the names are the same)."""
  if os.path.isdir(source):
    return "hf"
  if not os.path.isfile(source):
    raise FileNotFoundError(f"pre-trained source {source}: no such file or folder")
  return "openai" if tensor_files.is_torchscript(source) else "open_clip"


def load_pretrained(source: str, model_config, fmt: str = "auto",
                    tokenizer_dir: str | None = None) -> dict:
  """Tower params {img, txt, logit_scale} as float32 NumPy in our layout (scanned per
  `model_config.scan_layers`), from an HF CLIPModel folder, an OpenAI `.pt` or an open_clip
  state dict. The source's tower shape is checked against `model_config` (one error listing every
  mismatch, missing, unexpected or misshapen tensor); position embeddings are resized to the run's
  image size and truncated to a shorter text context. With `tokenizer_dir` (the run's tokenizer),
  model.text.eos_token_id is also checked against its end-of-text id. Any unreadable or unfit
  input raises ConversionError naming the file."""
  if fmt not in FORMATS:
    raise ConversionError(f"model_init_format: expected one of {FORMATS}, found {fmt!r}")
  if tokenizer_dir:
    tokenizer = text_pooling.read_tokenizer_ids(tokenizer_dir)
    if tokenizer is None:
      raise ConversionError(f"{tokenizer_dir}: no tokenizer.json or vocab.json")
    text_pooling.check_eos(model_config.text.get("eos_token_id"), model_config.text.vocab_size,
                           "model.text.eos_token_id", tokenizer)
  resolved = detect_format(source) if fmt == "auto" else fmt
  if resolved == "hf":
    return hf.load(source, model_config)
  if resolved == "openai":
    return openai.load(source, model_config)
  return open_clip.load(source, model_config, fmt="open_clip" if fmt == "open_clip"
                        else "OpenAI/open_clip state dict")


def model_config_from_source(source: str, fmt: str = "auto", tasks: Sequence[str] = (),
                             **overrides):
  """Our model config for a pre-trained source, towers as it states them (state dicts: OpenAI's
  conventions for heads, activation and eps, which their tensors do not store)."""
  resolved = detect_format(source) if fmt == "auto" else fmt
  if resolved == "hf":
    return hf.model_config_from_hf(source, tasks=tasks, **overrides)
  return openai.model_config_from_state_dict(open_clip.read(source), tasks=tasks, **overrides)


def host_array(leaf) -> np.ndarray:
  """One leaf on this host as NumPy (a jax.Array sharded over local devices is assembled)."""
  if not getattr(leaf, "is_fully_addressable", True):
    raise ConversionError(
        "export: a parameter spans several processes; restore it onto host NumPy with "
        "clipzoo_jax.checkpoint.restore_params (as tools/convert.py export does) and export from "
        "process 0")
  return np.asarray(leaf)


def heads_config(model_config) -> dict:
  """The JSON-able head settings that `torch_heads.TaskHeads` is built from: sizes, and the
  layout of every head (from the task specs), so the PyTorch module needs no task knowledge."""
  from clipzoo_jax import tasks as task_lib  # pylint: disable=import-outside-toplevel
  from clipzoo_jax.convert import torch_heads  # pylint: disable=import-outside-toplevel
  heads, image = model_config.heads, model_config.image
  return {
      "tasks": list(task_lib.canonical_order(heads.tasks)), "width": int(image.width),
      "hidden": int(heads.hidden), "upsample": int(heads.upsample),
      "num_seg_classes": int(heads.num_seg_classes),
      "num_det_classes": int(heads.num_det_classes), "patch_size": int(image.patch_size),
      "image_size": int(image.image_size), "layer_norm_eps": torch_heads.LAYER_NORM_EPS,
      "activation": torch_heads.HEADS_ACTIVATION,
      "heads": [spec.to_json() for spec in task_lib.head_specs(heads.tasks, model_config)],
  }


def export_pretrained(params: Mapping, model_config, out_dir: str, image_mean: Sequence[float],
                      image_std: Sequence[float], tokenizer_dir: str | None = None,
                      open_clip_path: str | None = None,
                      host: Callable = host_array) -> list[str]:
  """An HF CLIPModel folder (towers, config, tokenizer, preprocessor) plus, when the model has
  heads, `heads.safetensors`, `heads_config.json` and `torch_heads.py`; optionally an open_clip
  state dict. Leaves are fetched one at a time through `host`. A SigLIP-trained model's
  `logit_bias` is kept: in config.json (CLIPModel has no such weight) and in the open_clip state
  dict."""
  towers = {k: params[k] for k in ("img", "txt", "logit_scale")}
  bias = float(host(params["logit_bias"])) if "logit_bias" in params else None
  if open_clip_path:  # refuse what open_clip cannot express before writing anything
    open_clip.model_config_json(model_config)
  hf.export(towers, model_config, out_dir, image_mean, image_std, tokenizer_dir, host,
            logit_bias=bias)
  if model_config.heads.tasks:
    from clipzoo_jax.convert import torch_heads  # pylint: disable=import-outside-toplevel
    if "heads" not in params:
      raise ConversionError(f"export: model.heads.tasks = {list(model_config.heads.tasks)} but "
                            "params have no 'heads'")
    heads = {name: {layer: {leaf: host(v) for leaf, v in leaves.items()}
                    for layer, leaves in layers.items()}
             for name, layers in params["heads"].items()}
    torch_heads.save_heads(heads, heads_config(model_config), out_dir)
    shutil.copyfile(torch_heads.__file__, os.path.join(out_dir, "torch_heads.py"))
  if open_clip_path:
    open_clip.export(towers, model_config, open_clip_path, host, image_mean, image_std,
                     logit_bias=bias)
  return sorted(os.listdir(out_dir))


__all__ = ["ConversionError", "FORMATS", "detect_format", "export_pretrained", "heads_config",
           "host_array", "load_pretrained", "model_config_from_source"]
