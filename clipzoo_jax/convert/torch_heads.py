"""PyTorch reference of the dense task heads (clipzoo_jax/models/heads.py), run on Hugging Face
`CLIPVisionModel(...).last_hidden_state[:, 1:]`, and their weights as safetensors.

Self-contained (torch, numpy, safetensors; no JAX, no clipzoo_jax imports): the exporter copies
this file beside `heads.safetensors` so PyTorch users need only that folder:

  vision = transformers.CLIPVisionModel.from_pretrained(folder)
  heads = TaskHeads.from_pretrained(folder)
  out = heads(vision(pixel_values).last_hidden_state[:, 1:])  # {"seg": (B, H, W, C), ...}

Outputs are channels-last, as the JAX heads and the pseudo-label arrays, named and sliced as
`heads_config.json` lays them out (for the built-in tasks: seg and det_heatmap logits
(B, H, W, C), depth (B, H, W), unit normals (B, H, W, 3), det_size and det_offset (B, H, W, 2)).
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HEADS_CONFIG = "heads_config.json"
HEADS_WEIGHTS = "heads.safetensors"
LAYER_NORM_EPS = 1e-5  # heads.py's LayerNorm
# heads.py calls jax.nn.gelu, whose default is the tanh approximation; "gelu" is the exact one.
HEADS_ACTIVATION = "gelu_tanh"
ACTIVATIONS = {"gelu_tanh": "tanh", "gelu": "none"}  # -> F.gelu(approximate=...)
NORMALS_MIN_NORM = 1e-6
# where a head's last upsampling stage runs its conv (heads.py), per head in the layout; heads
# exported before the key existed have none and mean "conv"
FINAL_UPSAMPLE = ("bilinear", "conv")


def head_layout(config: Mapping) -> list[dict]:
  """The `heads` entry of a heads config: one {name, channels, outputs, final_upsample} per head
  module, each output {name, start, stop, unit_norm} a slice of the head's channels (stop None:
  one channel, axis dropped). Written by the exporter from the task specs, so this file knows no
  task."""
  layout = config.get("heads")
  if not isinstance(layout, list) or not all(isinstance(h, dict) for h in layout):
    raise ValueError(f"{HEADS_CONFIG}: expected a 'heads' list of head layouts (written by "
                     f"clipzoo_jax's exporter; re-export older folders), found {layout!r}")
  for head in layout:
    missing = sorted({"name", "channels", "outputs"} - set(head))
    if missing:
      raise ValueError(f"{HEADS_CONFIG}: head {head.get('name', head)!r} lacks {missing}")
  return layout


class UpsampleHead(nn.Module):
  """(B, g, g, D) -> (B, g*upsample, g*upsample, C): LayerNorm, 3x3 conv, [x2 bilinear, 3x3 conv]
  per stage, 1x1 conv, GELU between, as heads.UpsampleHead. `final_upsample` "bilinear": the
  last stage's conv runs before its x2 (no conv at the output size); "conv": after it."""

  def __init__(self, width: int, hidden: int, upsample: int, out_channels: int,
               eps: float = LAYER_NORM_EPS, activation: str = HEADS_ACTIVATION,
               final_upsample: str = "conv"):
    super().__init__()
    if activation not in ACTIVATIONS:
      raise ValueError(f"heads config: activation expected one of {sorted(ACTIVATIONS)}, "
                       f"found {activation!r}")
    if final_upsample not in FINAL_UPSAMPLE:
      raise ValueError(f"heads config: final_upsample expected one of {list(FINAL_UPSAMPLE)}, "
                       f"found {final_upsample!r}")
    self.final_upsample = final_upsample
    self.approximate = ACTIVATIONS[activation]
    self.stages = int(round(math.log2(upsample)))
    if 2 ** self.stages != upsample:
      raise ValueError(f"heads config: upsample must be a power of 2, found {upsample}")
    self.ln = nn.LayerNorm(width, eps=eps)
    self.conv_in = nn.Conv2d(width, hidden, 3, padding=1)
    for stage in range(self.stages):
      setattr(self, f"conv_up{stage}", nn.Conv2d(hidden, hidden, 3, padding=1))
    self.conv_out = nn.Conv2d(hidden, out_channels, 1)

  def forward(self, grid: torch.Tensor) -> torch.Tensor:
    x = self.ln(grid).permute(0, 3, 1, 2)
    x = F.gelu(self.conv_in(x), approximate=self.approximate)
    for stage in range(self.stages):
      conv = getattr(self, f"conv_up{stage}")
      if self.final_upsample == "bilinear" and stage == self.stages - 1:
        x = _upsample2x(F.gelu(conv(x), approximate=self.approximate))
      else:
        x = F.gelu(conv(_upsample2x(x)), approximate=self.approximate)
    return self.conv_out(x).permute(0, 2, 3, 1)


def _upsample2x(x: torch.Tensor) -> torch.Tensor:
  """Half-pixel bilinear x2 with edge clamping, identical to jax.image.resize upsampling."""
  return F.interpolate(x, size=(2 * x.shape[2], 2 * x.shape[3]), mode="bilinear",
                       align_corners=False)


def patch_grid(tokens: torch.Tensor) -> torch.Tensor:
  """(B, N, D) patch tokens (class token already dropped) -> (B, g, g, D)."""
  batch, count, width = tokens.shape
  grid = math.isqrt(count)
  if grid * grid != count:
    raise ValueError(f"patch tokens: expected a square number of tokens, found {count} (drop the "
                     "class token: last_hidden_state[:, 1:])")
  return tokens.reshape(batch, grid, grid, width)


class TaskHeads(nn.Module):
  """The heads of a heads config; `forward` takes (B, N, D) patch tokens or a (B, g, g, D) grid
  and returns each head's named outputs, channels-last."""

  def __init__(self, config: Mapping):
    super().__init__()
    self.config = dict(config)
    self.layout = head_layout(config)
    eps = config.get("layer_norm_eps", LAYER_NORM_EPS)
    activation = config.get("activation", HEADS_ACTIVATION)
    for head in self.layout:
      setattr(self, head["name"], UpsampleHead(config["width"], config["hidden"],
                                               config["upsample"], head["channels"], eps,
                                               activation, head.get("final_upsample", "conv")))

  def forward(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
    grid = patch_grid(patches) if patches.ndim == 3 else patches
    out = {}
    for head in self.layout:
      raw = getattr(self, head["name"])(grid)
      for output in head["outputs"]:
        start, stop = output["start"], output.get("stop")
        value = raw[..., start] if stop is None else raw[..., start:stop]
        if output.get("unit_norm"):
          value = value / value.norm(dim=-1, keepdim=True).clamp_min(NORMALS_MIN_NORM)
        out[output["name"]] = value
    return out

  @classmethod
  def from_pretrained(cls, folder: str) -> "TaskHeads":
    state, config = load_heads(folder)
    heads = cls(config)
    heads.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return heads.eval()


# ---------------------------------------------------------------------------------------------
# Our parameter tree (params["heads"], NumPy) <-> this module's state dict


def _torch_name(head: str, layer: str, leaf: str) -> str:
  if layer == "ln":
    return f"{head}.ln." + {"scale": "weight", "bias": "bias"}[leaf]
  return f"{head}.{layer}." + {"kernel": "weight", "bias": "bias"}[leaf]


def heads_to_torch(heads: Mapping) -> dict[str, np.ndarray]:
  """{head: {layer: {leaf: array}}} (flax names) -> this module's state dict (NumPy float32)."""
  state = {}
  for head, layers in heads.items():
    for layer, leaves in layers.items():
      for leaf, value in leaves.items():
        try:
          name = _torch_name(head, layer, leaf)
        except KeyError:
          raise ValueError(f"heads: parameter {head}/{layer}/{leaf} has no PyTorch name") from None
        value = np.asarray(value, np.float32)
        if leaf == "kernel":  # flax (kh, kw, in, out) -> torch (out, in, kh, kw)
          value = value.transpose(3, 2, 0, 1)
        state[name] = np.ascontiguousarray(value)
  return state


def heads_from_torch(state: Mapping) -> dict:
  """Inverse of `heads_to_torch`."""
  heads: dict = {}
  for name, value in state.items():
    head, layer, leaf = name.split(".")
    value = np.asarray(value, np.float32)
    if layer == "ln":
      leaf = {"weight": "scale", "bias": "bias"}[leaf]
    else:
      leaf = {"weight": "kernel", "bias": "bias"}[leaf]
      if leaf == "kernel":
        value = value.transpose(2, 3, 1, 0)
    heads.setdefault(head, {}).setdefault(layer, {})[leaf] = np.ascontiguousarray(value)
  return heads


def expected_state_shapes(config: Mapping) -> dict[str, tuple]:
  return {name: tuple(p.shape) for name, p in TaskHeads(config).state_dict().items()}


def save_heads(heads: Mapping, config: Mapping, folder: str) -> list[str]:
  """Writes `heads.safetensors` and `heads_config.json`; names and shapes must fit `config`."""
  from safetensors.numpy import save  # pylint: disable=import-outside-toplevel
  state = heads_to_torch(heads)
  _check_state(state, config, "heads params")
  os.makedirs(folder, exist_ok=True)
  weights, config_path = os.path.join(folder, HEADS_WEIGHTS), os.path.join(folder, HEADS_CONFIG)
  # Not safetensors' save_file: its temporary file leaves the weights mode 0600, unlike the other
  # exported files (0666 less the umask). open() + rename keeps the write atomic and the mode usual
  # (clipzoo_jax.atomic_files does the same; this file is shipped alone, so it cannot import it).
  temporary = f"{weights}.tmp-{os.getpid()}"
  with open(temporary, "wb") as f:
    f.write(save(state, metadata={"format": "pt"}))
  os.replace(temporary, weights)
  with open(config_path, "w") as f:
    json.dump(dict(config), f, indent=2)
  return [weights, config_path]


def load_heads(folder: str) -> tuple[dict[str, np.ndarray], dict]:
  """(state dict as NumPy, heads config) of an exported folder, names and shapes checked."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  with open(os.path.join(folder, HEADS_CONFIG)) as f:
    config = json.load(f)
  state = load_file(os.path.join(folder, HEADS_WEIGHTS))
  _check_state(state, config, os.path.join(folder, HEADS_WEIGHTS))
  return state, config


def _check_state(state: Mapping, config: Mapping, origin: str) -> None:
  expected = expected_state_shapes(config)
  missing = sorted(set(expected) - set(state))
  unexpected = sorted(set(state) - set(expected))
  wrong = [f"{n}: expected {expected[n]}, found {tuple(state[n].shape)}"
           for n in expected if n in state and tuple(state[n].shape) != expected[n]]
  if missing or unexpected or wrong:
    raise ValueError(f"{origin}: does not fit the heads config {config.get('tasks')}: missing "
                     f"{missing}, unexpected {unexpected}, wrong shapes {wrong}")
