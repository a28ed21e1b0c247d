"""open_clip state dicts: OpenAI's tensor names, often inside a training checkpoint
(`{'state_dict': ...}` with DistributedDataParallel's `module.` prefix). Import, and export of our
towers in that layout (`.safetensors` streamed, or `.pt`/`.bin` through torch.save)."""

from __future__ import annotations

import os
from typing import Callable, Mapping

import numpy as np

from clipzoo_jax.convert import layout
from clipzoo_jax.convert import openai
from clipzoo_jax.convert import tensor_files

DDP_PREFIX = "module."


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


def export(params: Mapping, model_config, path: str, host: Callable = np.asarray) -> str:
  """Writes our towers (`img`, `txt`, `logit_scale`) as an open_clip state dict; the format
  follows the extension (`.safetensors`, else a torch.save pickle)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith(".safetensors"):
    shapes = layout.torch_shapes(layout.plan(model_config, "openai"))
    with tensor_files.SafetensorsWriter(path, shapes, {"format": "pt"}) as writer:
      layout.to_torch(params, model_config, "openai", writer.write, host)
    return path
  import torch  # pylint: disable=import-outside-toplevel
  params = layout.unflatten({k: host(v) for k, v in layout.flatten(params).items()})
  arrays = layout.to_torch_arrays(params, model_config, "openai")
  torch.save({name: torch.from_numpy(value) for name, value in arrays.items()}, path)
  return path
