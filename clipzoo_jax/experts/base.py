"""The `Expert` interface (a batch of decoded images -> labels for one task) and the expert registry.

An expert has two stages so the pseudo-labelling job can overlap them: `prepare` is per-image CPU
work (model preprocessing), thread-safe, run in the job's decode pool; `run` is the batched
compute. `predict` chains both for callers that do not pipeline.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from clipzoo_jax import cli
from clipzoo_jax.data import records
from clipzoo_jax.experts import resize

DEPTH_KINDS = ("inverse", "metric")

# Expert kinds and the module that registers each; modules are imported on first use so that
# a toy-world job never imports torch or onnxruntime.
_KIND_MODULES = {
    "hf_depth": "clipzoo_jax.experts.hf_depth",
    "hf_semantic": "clipzoo_jax.experts.hf_segmentation",
    "hf_instance": "clipzoo_jax.experts.hf_instance",
    "hf_detection": "clipzoo_jax.experts.hf_instance",
    "onnx_normals": "clipzoo_jax.experts.onnx_normals",
    "depth_normals": "clipzoo_jax.experts.depth_normals",
    "toyworld": "clipzoo_jax.experts.toyworld_expert",
}
_REGISTRY: dict[str, Callable[..., "Expert"]] = {}


class ExpertError(cli.UserError):
  """An expert config or model is unusable; the message names the config field or the source."""


@dataclasses.dataclass
class Batch:
  """What experts see: record keys, decoded images (H, W, 3) uint8, and the labels produced so far
  by the experts that ran earlier on this batch (so normals can reuse the depth expert's output)."""
  keys: list[str]
  images: list[np.ndarray]
  labels: list[records.Labels]

  def __len__(self) -> int:
    return len(self.keys)


class Expert(abc.ABC):
  """Maps a batch of images to labels of one task at the stored label resolution.

  Subclasses set `task` (one of records.TASKS), `kind` (registry name), `source` (folder, hub id
  or module), `classes` (names by id, for seg and det), `depth_kind` (depth only) and
  `resolution` (a resize.LabelResolution), and implement `run`.
  """
  task: str
  kind: str
  source: str
  classes: tuple[str, ...] | None = None
  depth_kind: str | None = None
  resolution: resize.LabelResolution = resize.LabelResolution()
  needs: tuple[str, ...] = ()  # tasks whose labels (from earlier experts) `run` reads

  def prepare(self, image: np.ndarray, key: str) -> Any:
    """Per-image CPU work, safe to call from several threads. Default: nothing to do."""
    return image

  @abc.abstractmethod
  def run(self, prepared: Sequence[Any], batch: Batch) -> list[records.Labels]:
    """Labels of `batch` (only this expert's task filled), from `prepare`'s outputs in order."""

  def predict(self, batch: Batch) -> list[records.Labels]:
    return self.run([self.prepare(image, key) for image, key in zip(batch.images, batch.keys)],
                    batch)

  def bind(self, experts: Mapping[str, "Expert"]) -> None:
    """Called once with the job's experts, so an expert can find those of the tasks it needs."""

  def label_size(self, image: np.ndarray) -> tuple[int, int]:
    return self.resolution.size_for(image.shape[0], image.shape[1])

  def weights_sha256(self) -> str | None:
    """Checksum of the weight files (None for experts without weights)."""
    return None

  def manifest_entry(self) -> dict:
    """This task's entry in manifest.json (see shards.write_manifest)."""
    entry = {
        "expert": {"name": self.kind, "source": self.source,
                   "weights_sha256": self.weights_sha256()},
        "label_resolution": self.resolution.to_json(),
    }
    if self.classes is not None:
      entry["classes"] = list(self.classes)
    if self.task == "depth":
      entry["depth_kind"] = self.depth_kind
    return entry


def register(kind: str):
  """Class decorator: makes an expert buildable from a config with `kind: <kind>`."""
  def wrap(cls):
    _REGISTRY[kind] = cls
    return cls
  return wrap


def known_kinds() -> tuple[str, ...]:
  return tuple(sorted(_KIND_MODULES))


def build_expert(task: str, config: Mapping) -> Expert:
  """Builds the expert of `task` from its config: `kind` plus the kind's keyword arguments."""
  config = dict(config)
  kind = config.pop("kind", None)
  if kind not in _KIND_MODULES:
    raise ExpertError(f"experts.{task}.kind: expected one of {list(known_kinds())}, found {kind!r}")
  if task not in records.TASKS:
    raise ExpertError(f"experts.{task}: task not in the schema; expected one of {list(records.TASKS)}")
  importlib.import_module(_KIND_MODULES[kind])
  try:
    expert = _REGISTRY[kind](task=task, **config)
  except TypeError as e:
    raise ExpertError(f"experts.{task} (kind {kind!r}): {e}") from e
  if expert.task != task:
    raise ExpertError(f"experts.{task}: kind {kind!r} produces task {expert.task!r}, not {task!r}")
  return expert


def build_experts(configs: Mapping[str, Mapping]) -> dict[str, Expert]:
  """One expert per task, in an order where every expert runs after the tasks it needs."""
  experts = {task: build_expert(task, config) for task, config in configs.items()}
  ordered: dict[str, Expert] = {}
  while len(ordered) < len(experts):
    ready = [t for t, e in experts.items() if t not in ordered and set(e.needs) <= set(ordered)]
    if not ready:
      waiting = {t: e.needs for t, e in experts.items() if t not in ordered}
      raise ExpertError(f"experts: needed tasks are not configured (or form a cycle): {waiting}")
    for task in ready:
      ordered[task] = experts[task]
  for expert in ordered.values():
    expert.bind(ordered)
  return ordered


def check_depth_kind(depth_kind: str, where: str) -> str:
  if depth_kind not in DEPTH_KINDS:
    raise ExpertError(f"{where}: depth_kind expected one of {list(DEPTH_KINDS)}, found {depth_kind!r}")
  return depth_kind


def resolution_from(label_scale: float = 1.0, label_max_side: int | None = None) -> resize.LabelResolution:
  return resize.LabelResolution(scale=float(label_scale),
                                max_side=None if label_max_side is None else int(label_max_side))
