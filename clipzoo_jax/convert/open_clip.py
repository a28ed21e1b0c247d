"""open_clip state dicts: OpenAI's tensor names, often inside a training checkpoint
(`{'state_dict': ...}` with DistributedDataParallel's `module.` prefix). Import, and export of our
towers in that layout (`.safetensors` streamed, or `.pt`/`.bin` through torch.save) with the model
config open_clip builds the towers from (`open_clip_config.json` beside the weights, the format
open_clip's own hub export writes): without it open_clip would assume its defaults (argmax text
pooling, GELU, 64-wide vision heads, eps 1e-5) and silently compute something else.

First-eos text pooling (model.text.eos_token_id set) is written as `pool_type: "eos"` with `eos_id`,
which open_clip reads from version 3.1.0 on; older versions refuse the config rather than pool
elsewhere."""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping, Sequence

import numpy as np

from clipzoo_jax.convert import layout
from clipzoo_jax.convert import openai
from clipzoo_jax.convert import tensor_files
from clipzoo_jax.convert import text_pooling

DDP_PREFIX = "module."
CONFIG_FILE = "open_clip_config.json"  # open_clip.create_model("local-dir:FOLDER") reads it
# our activation -> (open_clip's quick_gelu flag, act_kwargs of its nn.GELU)
ACTIVATIONS = {"quick_gelu": (True, None), "gelu": (False, None),
               "gelu_tanh": (False, {"approximate": "tanh"})}


def read(path: str) -> tensor_files.TensorSource:
  """The state dict of an open_clip file, `state_dict` wrapper and `module.` prefix removed."""
  source = tensor_files.read_tensor_file(path)
  names = source.names()
  if names and all(n.startswith(DDP_PREFIX) for n in names):
    source = source.renamed(lambda n: n[len(DDP_PREFIX):])
  return source


def load(path: str, model_config, fmt: str = "open_clip") -> dict:
  """Our tower params from an open_clip (or OpenAI-named) state dict, checked against
  `model_config`."""
  return openai.load(path, model_config, source=read(path), fmt=fmt)


def _mlp_ratio(width: int, mlp_dim: int) -> float:
  """The float open_clip turns back into `int(width * mlp_ratio)` == mlp_dim."""
  ratio = mlp_dim / width
  if int(width * ratio) != mlp_dim:
    ratio = float(np.nextafter(ratio, np.inf))
  return ratio


def _tower_settings(tower, field: str) -> dict:
  if tower.activation not in ACTIVATIONS:
    raise layout.ConversionError(f"{field}.activation: expected one of {sorted(ACTIVATIONS)} for "
                                 f"open_clip, found {tower.activation!r}")
  settings = {"layers": int(tower.depth), "width": int(tower.width),
              "mlp_ratio": _mlp_ratio(int(tower.width), int(tower.mlp_dim)),
              "norm_kwargs": {"eps": float(tower.layer_norm_eps)}}
  act_kwargs = ACTIVATIONS[tower.activation][1]
  if act_kwargs:
    settings["act_kwargs"] = dict(act_kwargs)
  return settings


def model_config_json(model_config, image_mean: Sequence[float] | None = None,
                      image_std: Sequence[float] | None = None) -> dict:
  """`open_clip_config.json`: {"model_cfg": CLIP(**model_cfg) arguments, "preprocess_cfg"}."""
  img, txt = model_config.image, model_config.text
  quick = {field: ACTIVATIONS.get(t.activation, (None,))[0]
           for field, t in (("model.image", img), ("model.text", txt))}
  vision, text = _tower_settings(img, "model.image"), _tower_settings(txt, "model.text")
  if len(set(quick.values())) != 1:
    raise layout.ConversionError(
        "open_clip export: open_clip has one quick_gelu flag for both towers, found "
        f"model.image.activation {img.activation!r} and model.text.activation {txt.activation!r}")
  eos = txt.get("eos_token_id")
  text_pooling.check_eos(eos, txt.vocab_size, "model.text.eos_token_id")
  vision.update(patch_size=int(img.patch_size), image_size=int(img.image_size),
                head_width=int(img.width) // int(img.num_heads))
  text.update(context_length=int(txt.context_length), vocab_size=int(txt.vocab_size),
              heads=int(txt.num_heads), pool_type="argmax" if eos is None else "eos")
  if eos is not None:
    text["eos_id"] = int(eos)
  model_cfg = {"embed_dim": int(model_config.embed_dim), "quick_gelu": quick["model.image"],
               "vision_cfg": vision, "text_cfg": text}
  config = {"model_cfg": model_cfg,
            "preprocess_cfg": {"size": int(img.image_size), "interpolation": "bicubic",
                               "resize_mode": "shortest"}}
  if image_mean is not None and image_std is not None:
    config["preprocess_cfg"].update(mean=[float(m) for m in image_mean],
                                    std=[float(s) for s in image_std])
  return config


def export(params: Mapping, model_config, path: str, host: Callable = np.asarray,
           image_mean: Sequence[float] | None = None,
           image_std: Sequence[float] | None = None, logit_bias: float | None = None) -> str:
  """Writes our towers (`img`, `txt`, `logit_scale`) as an open_clip state dict, the format
  following the extension (`.safetensors`, else a torch.save pickle), and `open_clip_config.json`
  beside it. Refuses (before writing) what open_clip cannot express. `logit_bias` (SigLIP's
  learned bias) becomes open_clip's `logit_bias` tensor and `init_logit_bias`."""
  config = model_config_json(model_config, image_mean, image_std)
  bias = {} if logit_bias is None else {"logit_bias": np.asarray(logit_bias, np.float32)}
  if bias:
    config["model_cfg"]["init_logit_bias"] = float(logit_bias)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  if path.endswith(".safetensors"):
    shapes = layout.torch_shapes(layout.plan(model_config, "openai"))
    shapes.update({name: value.shape for name, value in bias.items()})
    with tensor_files.SafetensorsWriter(path, shapes, {"format": "pt"}) as writer:
      layout.to_torch(params, model_config, "openai", writer.write, host)
      for name, value in bias.items():
        writer.write(name, value)
  else:
    import torch  # pylint: disable=import-outside-toplevel
    params = layout.unflatten({k: host(v) for k, v in layout.flatten(params).items()})
    arrays = {**layout.to_torch_arrays(params, model_config, "openai"), **bias}
    torch.save({name: torch.from_numpy(value) for name, value in arrays.items()}, path)
  with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  return path
