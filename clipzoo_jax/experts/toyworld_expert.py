"""The toy-world ground truth as an expert: re-renders each scene from its record key, exactly.

Lets the pseudo-labelling job run end to end on the built-in data with perfect "experts"; the
manifest records them as the generator's ground truth, like `toyworld.write_dataset` does.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from clipzoo_jax import tasks as task_lib
from clipzoo_jax.data import records
from clipzoo_jax.experts import base

SOURCE = "clipzoo_jax.data.toyworld"


@functools.lru_cache(maxsize=256)
def _scene(key: str, size: int):
  # Cached: one job usually asks for several tasks of the same scene in a row.
  from clipzoo_jax.data import toyworld
  seed, index = toyworld.parse_key(key)
  return toyworld.render_scene(seed, index, size)


@base.register("toyworld")
class ToyworldExpert(base.Expert):
  """Ground truth of one task for toy-world records (keys from `toyworld.key_for`)."""
  kind = "toyworld"
  source = SOURCE

  def __init__(self, task: str, label_scale: float = 1.0, label_max_side: int | None = None):
    from clipzoo_jax.data import toyworld
    self.task = task
    self.resolution = base.resolution_from(label_scale, label_max_side)
    self.classes = {"seg": tuple(toyworld.SEG_CLASSES),
                    "det": tuple(toyworld.DET_CLASSES)}.get(task)
    self.depth_kind = "metric" if task == "depth" else None

  def run(self, prepared: Sequence, batch: base.Batch) -> list[records.Labels]:
    labels = []
    for key, image in zip(batch.keys, batch.images):
      height, width = image.shape[:2]
      if height != width:
        raise base.ExpertError(f"toyworld expert: record {key!r} has a {height}x{width} image; "
                               "toy-world scenes are square")
      scene = _scene(key, height)
      labels.append(task_lib.get(self.task).resize_labels(scene.labels,
                                                          self.label_size(image)))
    return labels

  def prepare(self, image: np.ndarray, key: str):
    return None
