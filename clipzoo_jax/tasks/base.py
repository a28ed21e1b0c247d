"""What a dense pseudo-label task is, in one place: the `Task` interface and the task registry.

A task owns everything that differs between tasks, for every stage that touches them:
- its fields in the batch contract (names, shapes, dtypes; `batch_fields`), which the loader
  fills, the train step receives and the AOT compile builds abstractly;
- how its stored record features parse and decode through the joint augmentation (`decode`,
  TensorFlow, imported only when the loader runs);
- its head layout (`heads`: module names, channels, output slices), which the JAX heads and the
  self-contained PyTorch heads both follow as data;
- its loss (`loss`), and a synthetic label batch for benchmarks and compile checks;
- how its labels are resized (toy-world expert), merged (pseudo-labelling job) and drawn
  (visualizer).

Adding a task is one module that subclasses `Task`, decorates it with `@register`, and is named
in `_TASK_MODULES`; the record schema (`data/records.py`) gains its codec.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping, Sequence

import numpy as np

from clipzoo_jax import cli

# Task name -> the module that registers it (imported on first use, like the expert registry).
_TASK_MODULES = {
    "seg": "clipzoo_jax.tasks.seg",
    "depth": "clipzoo_jax.tasks.depth",
    "normals": "clipzoo_jax.tasks.normals",
    "det": "clipzoo_jax.tasks.det",
}
_REGISTRY: dict[str, "Task"] = {}


@dataclasses.dataclass(frozen=True)
class OutputSlice:
  """One named output of a head: channels [start, stop), or the single channel `start` with the
  channel axis dropped when `stop` is None; `unit_norm` rescales it to unit length per pixel."""
  name: str
  start: int
  stop: int | None = None
  unit_norm: bool = False

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


# Where a head's last upsampling stage runs its 3x3 conv (models/heads.py): "bilinear", before
# the x2 (the head's output is bilinear interpolation of features a stage coarser), or "conv",
# after it, at the label size.
FINAL_UPSAMPLE = ("bilinear", "conv")


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """One head module on the patch grid: its parameter name (`heads/<name>`), output channels,
  the constant its output bias starts at, the named outputs cut from its channels, and where its
  last conv runs (FINAL_UPSAMPLE: "conv" for outputs with sharp edges, class maps and peaks)."""
  name: str
  channels: int
  outputs: tuple[OutputSlice, ...]
  bias_init: float = 0.0
  final_upsample: str = "bilinear"

  def to_json(self) -> dict:
    return {"name": self.name, "channels": self.channels, "bias_init": self.bias_init,
            "final_upsample": self.final_upsample, "outputs": [o.to_json() for o in self.outputs]}


@dataclasses.dataclass(frozen=True)
class Field:
  """A per-example array of the batch contract: shape without the batch axis, NumPy dtype."""
  shape: tuple[int, ...]
  dtype: Any


class Task:
  """Base of the task specs. Subclasses set `name` and `label_fields` and implement the rest."""
  name: str = ""
  label_fields: tuple[str, ...] = ()  # the `records.Labels` fields this task fills
  has_panel: bool = True  # the visualizer gives it a picture of its own (`label_image`)

  # -- batch contract ----------------------------------------------------------------------------

  def label_fields_spec(self, label_size: int, max_boxes: int, model_config) -> dict[str, Field]:
    """The task's label arrays in a batch (without its `<name>_mask`)."""
    raise NotImplementedError

  def batch_fields(self, label_size: int, max_boxes: int, model_config) -> dict[str, Field]:
    """Labels plus the (B,) float mask of examples that carry this task's label at all."""
    fields = dict(self.label_fields_spec(label_size, max_boxes, model_config))
    fields[f"{self.name}_mask"] = Field((), np.float32)
    return fields

  def synthetic_labels(self, rng: np.random.Generator, batch_size: int, label_size: int,
                       max_boxes: int, model_config) -> dict[str, np.ndarray]:
    """Plausible random labels for every field of `batch_fields` (benchmarks, compile checks)."""
    raise NotImplementedError

  def validate_config(self, config) -> None:
    """Raises cli.UserError, naming the key, for this task's config options (before compiling)."""

  def check_dataset(self, manifest_entry: Mapping, model_config, where: str) -> None:
    """Raises when the dataset's labels of this task cannot train the model's head (e.g. more
    classes than the head has); `manifest_entry` is `manifest["tasks"][name]`."""

  # -- loader (TensorFlow) -------------------------------------------------------------------------

  def parse_features(self) -> dict:
    """`tf.io.parse_single_example` features this task reads from a record."""
    raise NotImplementedError

  def decode(self, parsed: Mapping, window, flip, options) -> dict:
    """Parsed features -> the task's batch fields for one example, through the same crop window
    and flip as the image (`augment.sample_window_and_flip`)."""
    raise NotImplementedError

  def decode_numpy(self, features: Mapping, window, flip: bool, options, image_hw) -> dict:
    """The NumPy twin of `decode` for the grain loader's workers: `features` is a parsed record
    (`data/example_proto.parse`), window and flip come from `augment_np.sample_window_and_flip`.
    An absent label gives the task's empty label and a 0 mask; a broken one raises ValueError."""
    raise NotImplementedError

  # -- model and loss ------------------------------------------------------------------------------

  def heads(self, model_config) -> tuple[HeadSpec, ...]:
    raise NotImplementedError

  def loss_terms(self, outputs: Mapping, batch: Mapping, loss_config) -> tuple[Any, Any]:
    """(numerator, denominator) of the loss from the heads' named outputs and the batch: the
    loss is numerator / max(denominator, 1), and the denominator (a count of valid pixels, boxes
    or images) depends on the labels only, so the terms of micro-batches add up to the whole
    batch's (`clipzoo_jax.gradients`)."""
    raise NotImplementedError

  def loss(self, outputs: Mapping, batch: Mapping, loss_config) -> Any:
    """Scalar loss; 0 when nothing in the batch is labelled."""
    from clipzoo_jax import losses  # pylint: disable=import-outside-toplevel
    return losses.ratio(*self.loss_terms(outputs, batch, loss_config))

  # -- labels as NumPy (toy-world expert, pseudo-labelling job, visualizer) -----------------------

  def resize_labels(self, labels, size: tuple[int, int]):
    """`records.Labels` holding only this task's fields, resized to `size` (H, W)."""
    raise NotImplementedError

  def label_image(self, labels, classes: Sequence[str]) -> np.ndarray:
    """An RGB picture of the label (tasks with `has_panel`)."""
    raise NotImplementedError

  def draw_on_image(self, canvas, labels, image_shape, panel: int, classes) -> None:
    """Draws the label over the image panel (PIL image); dense tasks draw nothing there."""

  def has_label(self, labels) -> bool:
    return getattr(labels, self.label_fields[0]) is not None


def check_class_count(task: str, manifest_entry: Mapping, config_key: str, head_classes: int,
                      where: str) -> None:
  """The dataset's class names (from its experts) must fit the head's class count."""
  classes = list(manifest_entry.get("classes") or [])
  if len(classes) > int(head_classes):
    raise cli.UserError(f"{where}: task {task!r} has {len(classes)} classes ({', '.join(classes[:5])}"
                     f"{', ...' if len(classes) > 5 else ''}) but config.{config_key} is "
                     f"{head_classes}; set --config.{config_key}={len(classes)}")


def register(cls):
  """Class decorator: registers one instance of a Task subclass under its `name`."""
  if not cls.name or cls.name in _REGISTRY:
    raise ValueError(f"task {cls.__name__}: name {cls.name!r} is empty or already registered")
  _REGISTRY[cls.name] = cls()
  return cls


def names() -> tuple[str, ...]:
  """Every known task, in the schema's order."""
  return tuple(_TASK_MODULES)


def get(name: str, where: str = "task") -> Task:
  if name not in _TASK_MODULES:
    raise cli.UserError(f"{where}: unknown task {name!r}; expected one of {list(_TASK_MODULES)}")
  if name not in _REGISTRY:
    importlib.import_module(_TASK_MODULES[name])
  return _REGISTRY[name]


def get_all(task_names: Sequence[str], where: str = "tasks") -> tuple[Task, ...]:
  """The Task of each name, in the given order; an unknown name is an error naming `where`."""
  return tuple(get(name, where) for name in task_names)
