"""The one mapping between our tower parameters and PyTorch CLIP names (Hugging Face `CLIPModel`;
OpenAI, whose names open_clip shares), with exact shape transforms, used in both directions.

Transforms are pure reshapes/transposes, so JAX -> PyTorch -> JAX is bit-exact. OpenAI packs
q/k/v in one `in_proj_weight` (3D, D): each of our q/k/v leaves is a slot of it. The task heads'
mapping lives in torch_heads.py, which must stay importable without this package.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Iterator, Mapping

import numpy as np

from clipzoo_jax.convert import pos_embed
from clipzoo_jax.convert import text_pooling
from clipzoo_jax.convert.errors import ConversionError
from clipzoo_jax.convert.tensor_files import TensorSource

NAMINGS = ("hf", "openai")
TOWERS = ("img", "txt", "logit_scale")


@dataclasses.dataclass(frozen=True)
class Row:
  """One parameter: our path, its HF and OpenAI names, and how each is laid out in PyTorch.

  Block rows are relative to a block; `slot` is the index in OpenAI's packed q/k/v tensor.
  """
  ours: str
  hf: str
  openai: str
  hf_kind: str = "copy"
  openai_kind: str | None = None
  slot: int | None = None

  def kind(self, naming: str) -> str:
    return self.hf_kind if naming == "hf" or self.openai_kind is None else self.openai_kind


TOWER_ROWS = (
    Row("img/embedding/kernel", "vision_model.embeddings.patch_embedding.weight",
        "visual.conv1.weight", "conv"),
    Row("img/cls_token", "vision_model.embeddings.class_embedding", "visual.class_embedding"),
    Row("img/pos_embedding", "vision_model.embeddings.position_embedding.weight",
        "visual.positional_embedding"),
    Row("img/ln_pre/scale", "vision_model.pre_layrnorm.weight", "visual.ln_pre.weight"),
    Row("img/ln_pre/bias", "vision_model.pre_layrnorm.bias", "visual.ln_pre.bias"),
    Row("img/ln_post/scale", "vision_model.post_layernorm.weight", "visual.ln_post.weight"),
    Row("img/ln_post/bias", "vision_model.post_layernorm.bias", "visual.ln_post.bias"),
    Row("img/proj/kernel", "visual_projection.weight", "visual.proj", "transpose", "copy"),
    Row("txt/token_embedding/embedding", "text_model.embeddings.token_embedding.weight",
        "token_embedding.weight"),
    Row("txt/pos_embedding", "text_model.embeddings.position_embedding.weight",
        "positional_embedding"),
    Row("txt/ln_final/scale", "text_model.final_layer_norm.weight", "ln_final.weight"),
    Row("txt/ln_final/bias", "text_model.final_layer_norm.bias", "ln_final.bias"),
    Row("txt/proj/kernel", "text_projection.weight", "text_projection", "transpose", "copy"),
    Row("logit_scale", "logit_scale", "logit_scale"),
)

BLOCK_ROWS = (
    Row("ln_1/scale", "layer_norm1.weight", "ln_1.weight"),
    Row("ln_1/bias", "layer_norm1.bias", "ln_1.bias"),
    Row("attn/query/kernel", "self_attn.q_proj.weight", "attn.in_proj_weight", "heads_in", slot=0),
    Row("attn/query/bias", "self_attn.q_proj.bias", "attn.in_proj_bias", "heads_bias", slot=0),
    Row("attn/key/kernel", "self_attn.k_proj.weight", "attn.in_proj_weight", "heads_in", slot=1),
    Row("attn/key/bias", "self_attn.k_proj.bias", "attn.in_proj_bias", "heads_bias", slot=1),
    Row("attn/value/kernel", "self_attn.v_proj.weight", "attn.in_proj_weight", "heads_in", slot=2),
    Row("attn/value/bias", "self_attn.v_proj.bias", "attn.in_proj_bias", "heads_bias", slot=2),
    Row("attn/out/kernel", "self_attn.out_proj.weight", "attn.out_proj.weight", "heads_out"),
    Row("attn/out/bias", "self_attn.out_proj.bias", "attn.out_proj.bias"),
    Row("ln_2/scale", "layer_norm2.weight", "ln_2.weight"),
    Row("ln_2/bias", "layer_norm2.bias", "ln_2.bias"),
    Row("mlp/fc/kernel", "mlp.fc1.weight", "mlp.c_fc.weight", "transpose"),
    Row("mlp/fc/bias", "mlp.fc1.bias", "mlp.c_fc.bias"),
    Row("mlp/proj/kernel", "mlp.fc2.weight", "mlp.c_proj.weight", "transpose"),
    Row("mlp/proj/bias", "mlp.fc2.bias", "mlp.c_proj.bias"),
)

BLOCK_PREFIXES = {  # tower -> (ours, hf, openai) prefix of block i
    "img": ("img/encoder/block_{i}/", "vision_model.encoder.layers.{i}.",
            "visual.transformer.resblocks.{i}."),
    "txt": ("txt/encoder/block_{i}/", "text_model.encoder.layers.{i}.",
            "transformer.resblocks.{i}."),
}
NUM_QKV_SLOTS = 3

# kind -> (ours -> torch, (torch, our shape) -> ours, our shape -> torch shape)
TRANSFORMS: dict[str, tuple[Callable, Callable, Callable]] = {
    "copy": (lambda x: x, lambda t, s: t.reshape(s), lambda s: s),
    "transpose": (lambda x: x.T, lambda t, s: t.T, lambda s: s[::-1]),
    # flax conv (kh, kw, in, out) <-> torch (out, in, kh, kw)
    "conv": (lambda x: x.transpose(3, 2, 0, 1), lambda t, s: t.transpose(2, 3, 1, 0),
             lambda s: (s[3], s[2], s[0], s[1])),
    # (D, heads, head_dim) <-> Linear (heads*head_dim, D)
    "heads_in": (lambda x: x.reshape(x.shape[0], -1).T, lambda t, s: t.T.reshape(s),
                 lambda s: (s[1] * s[2], s[0])),
    "heads_bias": (lambda x: x.reshape(-1), lambda t, s: t.reshape(s), lambda s: (s[0] * s[1],)),
    # (heads, head_dim, D) <-> Linear (D, heads*head_dim)
    "heads_out": (lambda x: x.reshape(-1, x.shape[-1]).T, lambda t, s: t.T.reshape(s),
                  lambda s: (s[2], s[0] * s[1])),
}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One of our (unscanned) leaves and where it lives in a PyTorch state dict."""
  ours: str
  torch: str
  kind: str
  shape: tuple
  slot: int | None = None


def tower_shapes(model_config, image_grid: int | None = None,
                 context_length: int | None = None) -> dict[str, tuple]:
  """Our unscanned leaf shapes. `image_grid` / `context_length` override the config's (a source
  checkpoint's position embeddings before resizing)."""
  img, txt, embed = model_config.image, model_config.text, model_config.embed_dim
  grid = image_grid or img.image_size // img.patch_size
  length = context_length or txt.context_length
  shapes = {
      "img/embedding/kernel": (img.patch_size, img.patch_size, 3, img.width),
      "img/cls_token": (img.width,), "img/pos_embedding": (grid * grid + 1, img.width),
      "img/ln_pre/scale": (img.width,), "img/ln_pre/bias": (img.width,),
      "img/ln_post/scale": (img.width,), "img/ln_post/bias": (img.width,),
      "img/proj/kernel": (img.width, embed),
      "txt/token_embedding/embedding": (txt.vocab_size, txt.width),
      "txt/pos_embedding": (length, txt.width),
      "txt/ln_final/scale": (txt.width,), "txt/ln_final/bias": (txt.width,),
      "txt/proj/kernel": (txt.width, embed), "logit_scale": (),
  }
  for tower, cfg in (("img", img), ("txt", txt)):
    for i in range(cfg.depth):
      for name, shape in _block_shapes(cfg.width, cfg.num_heads, cfg.mlp_dim).items():
        shapes[BLOCK_PREFIXES[tower][0].format(i=i) + name] = shape
  return shapes


def _block_shapes(width: int, heads: int, mlp_dim: int) -> dict[str, tuple]:
  if width % heads:
    raise ConversionError(f"model config: width {width} is not divisible by num_heads {heads}")
  head_dim = width // heads
  shapes = {"ln_1/scale": (width,), "ln_1/bias": (width,), "ln_2/scale": (width,),
            "ln_2/bias": (width,), "attn/out/kernel": (heads, head_dim, width),
            "attn/out/bias": (width,), "mlp/fc/kernel": (width, mlp_dim), "mlp/fc/bias": (mlp_dim,),
            "mlp/proj/kernel": (mlp_dim, width), "mlp/proj/bias": (width,)}
  for name in ("query", "key", "value"):
    shapes[f"attn/{name}/kernel"] = (width, heads, head_dim)
    shapes[f"attn/{name}/bias"] = (heads, head_dim)
  return shapes


def plan(model_config, naming: str, image_grid: int | None = None,
         context_length: int | None = None) -> list[Entry]:
  """Every tower leaf of `model_config` with its PyTorch name under `naming` ('hf' or 'openai')."""
  if naming not in NAMINGS:
    raise ValueError(f"naming: expected one of {NAMINGS}, found {naming!r}")
  shapes = tower_shapes(model_config, image_grid, context_length)
  column = NAMINGS.index(naming) + 1
  entries = [Entry(r.ours, getattr(r, naming), r.kind(naming), shapes[r.ours]) for r in TOWER_ROWS]
  for tower, cfg in (("img", model_config.image), ("txt", model_config.text)):
    prefixes = BLOCK_PREFIXES[tower]
    for i in range(cfg.depth):
      for r in BLOCK_ROWS:
        ours = prefixes[0].format(i=i) + r.ours
        torch_name = prefixes[column].format(i=i) + getattr(r, naming)
        slot = r.slot if naming == "openai" else None
        entries.append(Entry(ours, torch_name, r.kind(naming), shapes[ours], slot))
  return entries


def torch_shapes(entries: list[Entry]) -> dict[str, tuple]:
  """PyTorch tensor name -> shape, packed q/k/v tensors counted once, in plan order."""
  shapes = {}
  for e in entries:
    shape = tuple(TRANSFORMS[e.kind][2](e.shape))
    if e.slot is not None:
      shape = (NUM_QKV_SLOTS * shape[0],) + shape[1:]
    shapes.setdefault(e.torch, shape)
  return shapes


# ---------------------------------------------------------------------------------------------
# Scanned <-> unscanned paths and nested <-> flat trees

_BLOCK = re.compile(r"^(img|txt)/encoder/block_(\d+)/(.+)$")
_BLOCKS = re.compile(r"^(img|txt)/encoder/blocks/(.+)$")


def flatten(tree: Mapping, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def unflatten(flat: Mapping) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def unscanned_leaves(flat: Mapping,
                     host: Callable = np.asarray) -> Iterator[tuple[str, np.ndarray]]:
  """(unscanned path, NumPy array) for every leaf; a scanned leaf (`encoder/blocks/...`, leading
  layer axis) yields one entry per layer. Each leaf passes through `host` exactly once."""
  for path, leaf in flat.items():
    match = _BLOCKS.match(path)
    value = host(leaf)
    if not match:
      yield path, value
      continue
    for i in range(value.shape[0]):
      yield f"{match.group(1)}/encoder/block_{i}/{match.group(2)}", value[i]


def stack_layers(flat: dict) -> dict:
  """Unscanned leaves -> scanned (`encoder/blocks/...` stacked on a leading axis); empties
  `flat` as it goes, so only one layer group is held twice."""
  layers: dict[str, dict[int, np.ndarray]] = {}
  out = {}
  for path in list(flat):
    match = _BLOCK.match(path)
    if match:
      layers.setdefault(f"{match.group(1)}/encoder/blocks/{match.group(3)}", {})[
          int(match.group(2))] = flat.pop(path)
    else:
      out[path] = flat.pop(path)
  for path, by_layer in layers.items():
    out[path] = np.stack([by_layer.pop(i) for i in range(len(by_layer))])
  return out


# ---------------------------------------------------------------------------------------------
# Our params -> PyTorch tensors


def to_torch(params: Mapping, model_config, naming: str, write: Callable,
             host: Callable = np.asarray) -> None:
  """Emits every tower leaf of `params` (nested, scanned or not; `img`, `txt`, `logit_scale`
  only) as `write(torch_name, array, slot, num_slots)`. Each leaf is fetched through `host` once,
  so a writer that streams to disk never holds a second copy. Unmapped or missing leaves: error."""
  entries = {e.ours: e for e in plan(model_config, naming)}
  flat = flatten(params)
  extra = sorted(p for p in flat if p.split("/")[0] not in TOWERS)
  if extra:
    raise ConversionError(f"export: parameters outside the towers have no {naming} name: {extra}")
  seen = set()
  for path, value in unscanned_leaves(flat, host):
    entry = entries.get(path)
    if entry is None:
      raise ConversionError(f"export: parameter {path!r} has no {naming} name (model config and "
                            "params disagree?)")
    if tuple(value.shape) != entry.shape:
      raise ConversionError(f"export: parameter {path!r}: expected shape {entry.shape} from the "
                            f"model config, found {tuple(value.shape)}")
    slots = (entry.slot, NUM_QKV_SLOTS) if entry.slot is not None else (0, 1)
    write(entry.torch, TRANSFORMS[entry.kind][0](np.asarray(value, np.float32)), *slots)
    seen.add(path)
  missing = sorted(set(entries) - seen)
  if missing:
    raise ConversionError(f"export: the model config has parameters missing from params: {missing}")


def to_torch_arrays(params: Mapping, model_config, naming: str) -> dict[str, np.ndarray]:
  """In-memory PyTorch-layout state dict (NumPy float32) of the towers."""
  entries = plan(model_config, naming)
  arrays = {name: np.empty(shape, np.float32) for name, shape in torch_shapes(entries).items()}

  def write(name, value, slot, num_slots):
    target = arrays[name]
    if num_slots > 1:
      size = target.shape[0] // num_slots
      target = target[slot * size:(slot + 1) * size]
    target[...] = value

  to_torch(params, model_config, naming, write)
  return arrays


# ---------------------------------------------------------------------------------------------
# PyTorch tensors -> our params, with every check


def tensor_problems(source: TensorSource, entries: list[Entry],
                    ignore: re.Pattern | None = None) -> list[str]:
  """Missing keys, unexpected keys and wrong shapes, each listed by name."""
  expected = torch_shapes(entries)
  names = [n for n in source.names() if not (ignore and ignore.search(n))]
  problems = []
  missing = [n for n in expected if n not in set(names)]
  unexpected = sorted(n for n in names if n not in expected)
  if missing:
    problems.append(f"missing keys ({len(missing)}): {_listed(missing)}")
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
  wrong = [f"{n}: expected {expected[n]}, found {source.shape(n)}"
           for n in names if n in expected and tuple(source.shape(n)) != expected[n]]
  if wrong:
    more = f" ... and {len(wrong) - MAX_LISTED} more" if len(wrong) > MAX_LISTED else ""
    problems.append(f"wrong shapes ({len(wrong)}): " + "; ".join(wrong[:MAX_LISTED]) + more)
  return problems


HINTS = {  # what a user can do about a mismatch of this field (found values are checked first)
    "text.context_length": "the run's context may be shorter than the source's, not longer",
    "text.eos_token_id": "set model.text.eos_token_id to the found value (None: argmax pooling), "
                         "which is the end-of-text id of the tokenizer the source was trained with",
}
MAX_LISTED = 20


def _listed(names: list[str]) -> str:
  more = f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
  return f"{names[:MAX_LISTED]}{more}"


def run_config_problems(model_config, tokenizer=None) -> list[str]:
  """What the run's own model config states that no model can be: an activation the towers do not
  implement, an end-of-text id outside the vocabulary (or not the tokenizer's, when given)."""
  from clipzoo_jax.models import transformer  # pylint: disable=import-outside-toplevel
  problems = []
  for tower in ("image", "text"):
    activation = model_config[tower].get("activation")
    if activation not in transformer.ACTIVATIONS:
      problems.append(f"model.{tower}.activation: expected one of "
                      f"{sorted(transformer.ACTIVATIONS)}, found {activation!r} (run config)")
  text = model_config.text
  problems += text_pooling.eos_problems(text.get("eos_token_id"), text.vocab_size,
                                        "model.text.eos_token_id", tokenizer)
  return problems


def config_mismatches(found: Mapping[str, tuple], model_config) -> list[str]:
  """`found` maps dotted config fields ('image.width') to (value, where it was read). The image
  size may differ (position embeddings are resized) and the run's text context may be shorter."""
  mismatches = []
  for field, (value, where) in found.items():
    expected = model_config
    for part in field.split("."):
      expected = expected.get(part) if expected is not None else None
    if field == "image.image_size":
      continue
    if field == "text.context_length" and value is not None and expected <= value:
      continue
    same = (math.isclose(expected, value, rel_tol=1e-9) if isinstance(value, float)
            and isinstance(expected, (int, float)) else expected == value)
    if not same:
      hint = f"; {HINTS[field]}" if field in HINTS else ""
      mismatches.append(f"{field}: expected {expected!r} (run config), found {value!r} "
                        f"({where}){hint}")
  return mismatches


def raise_problems(origin: str, fmt: str, mismatches: list[str], problems: list[str]) -> None:
  if not mismatches and not problems:
    return
  lines = [f"{origin}: cannot import as {fmt} into the run's model config:"]
  if mismatches:
    lines.append("  config mismatches (field: expected, found):")
    lines += [f"    {m}" for m in mismatches]
  lines += [f"  {p}" for p in problems]
  raise ConversionError("\n".join(lines))


def checked_plan(source: TensorSource, model_config, naming: str, fmt: str,
                 found: Mapping[str, tuple], ignore: re.Pattern | None = None) -> list[Entry]:
  """The plan for reading `source` (at its own image grid and text length), after checking the
  source's config (`found`) and every tensor name and shape; one error lists every problem."""
  source_size, _ = found.get("image.image_size", (None, None))
  grid = source_size // model_config.image.patch_size if source_size else None
  context, _ = found.get("text.context_length", (None, None))
  mismatches = run_config_problems(model_config) + config_mismatches(found, model_config)
  try:
    entries = plan(model_config, naming, image_grid=grid, context_length=context)
  except ConversionError:
    if not mismatches:
      raise
    entries = []
  # A config mismatch makes every dependent shape wrong: report the cause, not its echoes.
  problems = tensor_problems(source, entries, ignore) if entries else []
  if mismatches:
    problems = [p for p in problems if not p.startswith("wrong shapes")]
  raise_problems(source.origin, fmt, mismatches, problems)
  return entries


def read_entries(source: TensorSource, entries: list[Entry]) -> dict[str, np.ndarray]:
  """Our flat unscanned leaves; each source tensor is read once and dropped after its last use."""
  uses: dict[str, int] = {}
  for e in entries:
    uses[e.torch] = uses.get(e.torch, 0) + 1
  cache: dict[str, np.ndarray] = {}
  flat = {}
  for e in entries:
    tensor = cache.pop(e.torch) if e.torch in cache else source.get(e.torch)
    uses[e.torch] -= 1
    if uses[e.torch]:
      cache[e.torch] = tensor
    if e.slot is not None:
      tensor = np.split(tensor, NUM_QKV_SLOTS)[e.slot]
    flat[e.ours] = np.array(TRANSFORMS[e.kind][1](tensor, e.shape), np.float32, order="C")
  return flat


def from_torch(source: TensorSource, model_config, naming: str, fmt: str,
               found: Mapping[str, tuple], ignore: re.Pattern | None = None) -> dict:
  """Our nested float32 params (`img`, `txt`, `logit_scale`; scanned per
  `model_config.scan_layers`) from checked PyTorch tensors, position embeddings resized to the
  run's image size and text context."""
  flat = read_entries(source, checked_plan(source, model_config, naming, fmt, found, ignore))
  flat["img/pos_embedding"] = pos_embed.resize_image_pos_embedding(
      flat["img/pos_embedding"], model_config.image.image_size // model_config.image.patch_size)
  flat["txt/pos_embedding"] = pos_embed.truncate_text_pos_embedding(
      flat["txt/pos_embedding"], model_config.text.context_length)
  if model_config.get("scan_layers"):
    flat = stack_layers(flat)
  return unflatten(flat)
