"""The training input pipelines, chosen by `config.data.loader`, behind one interface, so the
trainer does not change when the loader does.

  grain   (default) `grain_loader.GrainPipeline`: random access through the shards' `.index`
          offsets, global shuffle, worker processes, constant-time exact resume, bad records
          skipped and counted.
  tfdata  `loader.InputPipeline`: the earlier tf.data reader (sequential shards, a shuffle
          buffer, resume by re-reading the consumed records); kept for comparison.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Protocol, Sequence

import numpy as np

from clipzoo_jax import cli

LOADERS = ("grain", "tfdata")


class Pipeline(Protocol):
  """What the trainer uses of an input pipeline."""
  local_batch_size: int
  last_keys: list  # record keys of the latest batch

  def __next__(self) -> dict[str, np.ndarray]: ...
  def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...
  def counters(self) -> dict[str, float]: ...
  def get_state(self) -> dict: ...
  def set_state(self, state: Mapping) -> None: ...
  def close(self) -> None: ...


def build(data_config, tokenizer, global_batch_size: int, tasks: Sequence[str], seed: int = 0,
          process_index: int = 0, process_count: int = 1, train: bool = True) -> Pipeline:
  kind = data_config.get("loader", "grain") or "grain"
  if kind == "grain":
    from clipzoo_jax.data import grain_loader  # pylint: disable=import-outside-toplevel
    return grain_loader.GrainPipeline(data_config, tokenizer, global_batch_size, tasks, seed=seed,
                                      process_index=process_index, process_count=process_count,
                                      train=train)
  if kind == "tfdata":
    from clipzoo_jax.data import loader  # pylint: disable=import-outside-toplevel
    return loader.InputPipeline(data_config, tokenizer, global_batch_size, tasks, seed=seed,
                                process_index=process_index, process_count=process_count,
                                train=train)
  raise cli.UserError(f"config.data.loader: expected one of {list(LOADERS)}, found {kind!r}")
