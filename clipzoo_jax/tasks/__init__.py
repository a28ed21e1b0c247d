"""The dense pseudo-label tasks (seg, depth, normals, det), each in one module; see `base.py`."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from clipzoo_jax import cli
from clipzoo_jax.tasks.base import (FINAL_UPSAMPLE, Field, HeadSpec, OutputSlice, Task, get,
                                    get_all, names, register)

__all__ = ["FINAL_UPSAMPLE", "Field", "HeadSpec", "OutputSlice", "Task", "get", "get_all", "names", "register",
           "canonical_order", "batch_fields", "check_dataset", "head_specs"]


def canonical_order(task_names: Sequence[str]) -> tuple[str, ...]:
  """The given tasks in the schema's order (so sums and layouts do not depend on config order);
  an unknown name is an error."""
  get_all(task_names)
  return tuple(name for name in names() if name in set(task_names))


def batch_fields(task_names: Sequence[str], label_size: int, max_boxes: int,
                 model_config) -> dict[str, Field]:
  """The batch contract: image and tokens, then each task's labels and mask (per example)."""
  image_size = int(model_config.image.image_size)
  fields = {"image": Field((image_size, image_size, 3), np.uint8),
            "tokens": Field((int(model_config.text.context_length),), np.int32)}
  for task in get_all(canonical_order(task_names), "model.heads.tasks"):
    fields.update(task.batch_fields(label_size, max_boxes, model_config))
  return fields


def check_dataset(task_names: Sequence[str], manifest: dict, model_config, where: str) -> None:
  """Every active task is in the dataset, and its labels fit the model's heads."""
  found = manifest.get("tasks", {})
  for task in get_all(canonical_order(task_names), "model.heads.tasks"):
    if task.name not in found:
      raise cli.UserError(f"{where}: task {task.name!r} of config.model.heads.tasks is not in the "
                       f"dataset (manifest tasks: {sorted(found)})")
    task.check_dataset(found[task.name], model_config, where)


def head_specs(task_names: Sequence[str], model_config) -> tuple[HeadSpec, ...]:
  """Every head module of the active tasks, in the schema's order, each with the place of its
  last conv that `model.heads.final_upsample` says: "auto" (the default), the head's own (its
  task's HeadSpec); "bilinear" or "conv", every head's. A config saved before the key existed
  means "conv": every head then ran its last conv at the label size."""
  specs = tuple(spec for task in get_all(canonical_order(task_names), "model.heads.tasks")
                for spec in task.heads(model_config))
  choice = model_config.heads.get("final_upsample", "conv")
  if choice not in ("auto",) + FINAL_UPSAMPLE:
    raise cli.UserError(f"model.heads.final_upsample: expected one of "
                        f"{['auto', *FINAL_UPSAMPLE]}, found {choice!r}")
  if choice == "auto":
    return specs
  return tuple(dataclasses.replace(spec, final_upsample=choice) for spec in specs)
