"""An uncurated image-caption corpus of the toy world, as webdataset tars: the web-like input that
the miniature experiment pseudo-labels (tools/pseudo_label.py reads it as `tar:PATTERN`).

Web captions are noisy, and CLIPTeX's claim is about such data, so a fixed share of captions is
wrong (another scene's caption, or the true one with a colour or shape swapped for one the image
does not show) and a share is vague ("a room", "nice photo"); the rest are the toy world's true
captions. Which keys are noisy is decided from the params alone (a seeded permutation), written
to a JSON sidecar before the first tar, and so known to anyone reporting the noise rate.

Each tar is written under a temporary name and renamed when complete; a rerun keeps the tars
that hold every expected member and redoes the others, and refuses other params.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from typing import Callable

import numpy as np

from clipzoo_jax import atomic_files
from clipzoo_jax import cli
from clipzoo_jax.data import records, toyworld

SIDECAR_NAME = "corpus.json"
NOISE_KINDS = ("wrong", "vague")
VAGUE_CAPTIONS = ("a room", "some objects on the floor", "nice photo", "a picture",
                  "an indoor scene", "things in a room", "my photo", "untitled",
                  "a few shapes", "look at this")
JPEG_QUALITY = 95


def tar_name(index: int) -> str:
  return f"{index:05d}.tar"


def tar_pattern(out_dir: str, num_tars: int) -> str:
  """The `tar:` corpus spec of the tars (brace range, as tools/pseudo_label.py takes it)."""
  first, last = tar_name(0)[:-len(".tar")], tar_name(num_tars - 1)[:-len(".tar")]
  return "tar:" + os.path.join(out_dir, f"{{{first}..{last}}}.tar")


def _check_arguments(num_examples: int, num_tars: int, noise: dict, size: int) -> None:
  unknown = sorted(set(noise) - set(NOISE_KINDS))
  if unknown:
    raise cli.UserError(f"write_corpus: noise keys expected some of {list(NOISE_KINDS)}, found "
                        f"{unknown}")
  shares = [float(noise.get(kind, 0.0)) for kind in NOISE_KINDS]
  if min(shares) < 0 or sum(shares) > 1:
    raise cli.UserError(f"write_corpus: noise shares must be >= 0 and sum to <= 1, found {noise}")
  if num_examples < 1 or not 1 <= num_tars <= num_examples or size < 8:
    raise cli.UserError(f"write_corpus: expected num_examples >= 1, 1 <= num_tars <= "
                        f"num_examples and size >= 8; found num_examples={num_examples}, "
                        f"num_tars={num_tars}, size={size}")


def noise_assignment(params: dict) -> dict[str, str]:
  """key -> "wrong" | "vague" for the noisy examples: round(share * num_examples) of each kind,
  picked by a permutation seeded by the corpus seed (so the same params give the same keys)."""
  n, seed = params["num_examples"], params["seed"]
  order = np.random.default_rng([seed, 7]).permutation(n)
  counts = [int(round(params["noise"][kind] * n)) for kind in NOISE_KINDS]
  kinds, start = {}, 0
  for kind, count in zip(NOISE_KINDS, counts):
    for index in sorted(order[start:start + count].tolist()):
      kinds[toyworld.key_for(seed, index)] = kind
    start += count
  return kinds


def read_sidecar(out_dir: str) -> dict:
  """The corpus's params and noise record: {params, counts, noise_rate, noisy: {key: kind}}."""
  with open(os.path.join(out_dir, SIDECAR_NAME)) as f:
    return json.load(f)


def _check_or_write_sidecar(out_dir: str, params: dict) -> dict:
  """An existing corpus must have these params (else a one-line error naming what differs)."""
  path = os.path.join(out_dir, SIDECAR_NAME)
  if os.path.exists(path):
    sidecar = read_sidecar(out_dir)
    found = sidecar.get("params", {})
    differ = [f"{k}: found {found.get(k)!r}, this call {v!r}" for k, v in params.items()
              if found.get(k) != v]
    if differ:
      raise cli.UserError(f"{path}: the corpus there was written with other params ("
                          f"{'; '.join(differ)}); use another directory or the same arguments")
    return sidecar
  if any(name.endswith(".tar") for name in os.listdir(out_dir)):
    raise cli.UserError(f"{out_dir}: holds .tar files but no {SIDECAR_NAME}; not a toy-world "
                        "corpus, use an empty directory")
  noisy = noise_assignment(params)
  counts = {kind: sum(v == kind for v in noisy.values()) for kind in NOISE_KINDS}
  counts["true"] = params["num_examples"] - len(noisy)
  sidecar = {"params": params, "counts": counts,
             "noise_rate": {k: counts[k] / params["num_examples"] for k in NOISE_KINDS},
             "noisy": noisy}
  atomic_files.write_json(path, sidecar, indent=1)
  return sidecar


# ---------------------------------------------------------------------------------------------
# Captions of one tar.


def _swapped_caption(rng, scene: toyworld.Scene) -> str:
  """The scene's caption grammar on facts with one visible object's colour (or shape) replaced by
  one the image does not show; an empty room gets an object it does not hold."""
  facts = toyworld.caption_facts(scene.objects, scene.visible, scene.instances, scene.camera)
  shown = {scene.objects[i].colour for i in scene.visible}
  other_colours = [c for c in toyworld.OBJECT_COLOURS if c not in shown]
  if not facts:
    phrase = f"{rng.choice(other_colours)} {rng.choice(toyworld.DET_CLASSES)}"
    return f"a photo of {'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"
  victim = int(rng.integers(len(facts)))
  colour, shape = facts[victim]["phrase"].rsplit(" ", 1)
  if rng.random() < 0.5:
    colour = str(rng.choice(other_colours))
  else:
    shape = str(rng.choice([s for s in toyworld.DET_CLASSES if s != shape]))
  facts[victim] = {**facts[victim], "phrase": f"{colour} {shape}"}
  return toyworld.make_caption(rng, facts, scene.room)


def _shown(scene: toyworld.Scene) -> set[tuple[str, str]]:
  return {(scene.objects[i].colour, scene.objects[i].shape) for i in scene.visible}


def tar_captions(scenes: list[toyworld.Scene], noisy: dict[str, str]) -> list[str]:
  """Each scene's caption as the corpus holds it: true, wrong or vague (by `noisy`). A wrong one
  is the next scene's caption in the tar when that shows other objects, else a swapped one."""
  captions = []
  for position, scene in enumerate(scenes):
    seed, index = toyworld.parse_key(scene.key)
    kind = noisy.get(scene.key)
    rng = np.random.default_rng([seed, index, 11])
    if kind == "vague":
      captions.append(str(rng.choice(VAGUE_CAPTIONS)))
    elif kind == "wrong":
      other = scenes[(position + 1) % len(scenes)]
      use_other = rng.random() < 0.5 and _shown(other) != _shown(scene)
      captions.append(other.caption if use_other else _swapped_caption(rng, scene))
    else:
      captions.append(scene.caption)
  return captions


# ---------------------------------------------------------------------------------------------
# Tars.


def _expected_members(keys: list[str]) -> list[str]:
  return [f"{key}.{extension}" for key in keys for extension in ("jpg", "txt")]


def is_complete(path: str, keys: list[str]) -> bool:
  """Whether the tar at `path` holds exactly the expected members, each readable to its end."""
  try:
    with tarfile.open(path, "r") as tar:
      names = []
      for member in tar:
        names.append(member.name)
        tar.extractfile(member).read()
    return names == _expected_members(keys)
  except (OSError, EOFError, tarfile.TarError):
    return False


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed: same params, same bytes
  tar.addfile(info, io.BytesIO(data))


def _write_tar(path: str, scenes: list[toyworld.Scene], captions: list[str]) -> None:
  temporary = atomic_files.temp_path(path)
  with tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as tar:
    for scene, caption in zip(scenes, captions):
      _add_member(tar, scene.key + ".jpg", records.encode_jpeg(scene.image, JPEG_QUALITY))
      _add_member(tar, scene.key + ".txt", caption.encode("utf-8"))
  atomic_files.publish(temporary, path)


def write_corpus(out_dir: str, num_examples: int, seed: int = 3000, num_tars: int = 8,
                 noise: dict | None = None, size: int = 64,
                 log: Callable[[str], None] | None = print) -> str:
  """Writes examples 0..num_examples-1 of toy world `seed` as `out_dir/{00000..}.tar` with
  uncurated captions (`noise`: shares of wrong and vague ones, default 0.15 each); returns the
  `tar:` pattern. Resumable: complete tars are kept, others (partial, truncated) redone."""
  noise = dict(wrong=0.15, vague=0.15) if noise is None else dict(noise)
  _check_arguments(num_examples, num_tars, noise, size)
  params = {"seed": seed, "num_examples": num_examples, "num_tars": num_tars, "size": size,
            "noise": {kind: float(noise.get(kind, 0.0)) for kind in NOISE_KINDS},
            "jpeg_quality": JPEG_QUALITY}
  os.makedirs(out_dir, exist_ok=True)
  sidecar = _check_or_write_sidecar(out_dir, params)
  for name in os.listdir(out_dir):
    if atomic_files.is_temp(name):  # debris of a killed writer
      os.remove(os.path.join(out_dir, name))
  bounds = [num_examples * i // num_tars for i in range(num_tars + 1)]
  start, written = time.perf_counter(), 0
  for t in range(num_tars):
    path = os.path.join(out_dir, tar_name(t))
    keys = [toyworld.key_for(seed, i) for i in range(bounds[t], bounds[t + 1])]
    if is_complete(path, keys):
      continue
    scenes = [toyworld.render_scene(seed, i, size) for i in range(bounds[t], bounds[t + 1])]
    _write_tar(path, scenes, tar_captions(scenes, sidecar["noisy"]))
    written += len(keys)
    if log:
      noisy = [sidecar["noisy"].get(k) for k in keys]
      log(f"corpus: {path} done ({len(keys)} images, {noisy.count('wrong')} wrong and "
          f"{noisy.count('vague')} vague captions), tar {t + 1}/{num_tars}, "
          f"{written / (time.perf_counter() - start):.0f} images/s")
  if log and not written:
    log(f"corpus: {out_dir}: all {num_tars} tars complete, nothing to do")
  return tar_pattern(out_dir, num_tars)
