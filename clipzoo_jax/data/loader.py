"""The training input pipeline: per-process tf.data over the pseudo-label shards, joint
augmentation, tokenized captions, and global `jax.Array` batches sharded over the mesh.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging
from typing import Mapping, Sequence

import jax
import numpy as np
import tensorflow as tf

from clipzoo_jax import cli
from clipzoo_jax import tasks as task_lib
from clipzoo_jax.data import augment, augment_np, records, shards

STATE_VERSION = 1
_NO_KEY = "<no key>"
_field = augment_np.field
augment_options = augment_np.augment_options  # the evaluators' preprocessing reads it from here


def _derived_seed(*parts: int) -> int:
  """A well-mixed non-negative int64 seed from integers: seed 1 and seed 2 streams are unrelated."""
  words = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(2, np.uint32)
  return (int(words[0]) << 31) | (int(words[1]) >> 1)


# ---------------------------------------------------------------------------------------------
# Decoding: the common fields here, each task's labels by its task spec (clipzoo_jax/tasks).


def _parse_spec(tasks: Sequence[str]) -> dict:
  spec = {
      "key": tf.io.FixedLenFeature([], tf.string),
      "image/encoded": tf.io.FixedLenFeature([], tf.string),
      "text": tf.io.FixedLenFeature([], tf.string),
  }
  for task in task_lib.get_all(tasks):
    spec.update(task.parse_features())
  return spec


def decode_and_augment(serialized, seed, tasks: Sequence[str], options: augment.AugmentOptions,
                       train: bool) -> dict:
  """One serialized record to the per-example tensors of the batch contract (+ key and text)."""
  parsed = tf.io.parse_single_example(serialized, _parse_spec(tasks))
  # The accurate IDCT gives PIL's pixels (the experts saw those); TF's default differs by ~4 levels.
  image = tf.io.decode_jpeg(parsed["image/encoded"], channels=3, dct_method="INTEGER_ACCURATE")
  window, flip = augment.sample_window_and_flip(seed, tf.shape(image)[:2], options, train)
  out = {"key": parsed["key"], "text": parsed["text"],
         "image": augment.augment_image_uint8(image, window, flip, options.image_size,
                                              options.antialias)}
  for task in task_lib.get_all(tasks):
    out.update(task.decode(parsed, window, flip, options))
  return out


def _record_key(serialized) -> str:
  parsed = tf.io.parse_single_example(
      serialized, {"key": tf.io.FixedLenFeature([], tf.string, default_value=_NO_KEY)})
  return parsed["key"].numpy().decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------
# The pipeline.


def _check_tasks(tasks: Sequence[str], manifest: Mapping, directory: str) -> tuple[str, ...]:
  found = sorted(manifest.get("tasks", {}))
  for task in tasks:
    task_lib.get(task, "loader tasks")
    if task not in found:
      raise cli.UserError(f"task {task!r} is not in the dataset {directory} (manifest tasks: {found})")
  return tuple(tasks)


class InputPipeline:
  """Per-process iterator of NumPy batches following the batch contract of the train step.

  Each process reads its own shards (or, with fewer shards than processes, its own records of
  every shard). Training repeats forever; epoch e shuffles files and records with seeds derived
  from (seed, e), and example n of this process's stream is augmented with seed (seed, n).
  Eval (`train=False`) is one pass in manifest order with central crops; its last batch may be
  short. `get_state()` / `set_state()` make a restored pipeline yield what an uninterrupted one
  would. `last_keys` holds the record keys of the latest batch (strings stay out of the batch).

  Data config fields: directory, image_size (required); label_size (image_size), max_boxes (16),
  crop_scale ((0.5, 1)), crop_ratio ((3/4, 4/3)), flip_probability (0.5),
  min_box_area_fraction (0.25), antialias (False), shuffle_buffer (1024, records),
  num_parallel_calls (AUTOTUNE), cycle_length (4 shards read at once), prefetch (2 batches).
  """

  def __init__(self, config, tokenizer, global_batch_size: int, tasks: Sequence[str],
               seed: int = 0, process_index: int | None = None,
               process_count: int | None = None, train: bool = True):
    self.directory = str(_field(config, "directory"))
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    self.process_count = jax.process_count() if process_count is None else int(process_count)
    if global_batch_size % self.process_count:
      raise cli.UserError(f"global batch size {global_batch_size} does not divide by the process "
                       f"count {self.process_count}")
    self.global_batch_size = int(global_batch_size)
    self.local_batch_size = self.global_batch_size // self.process_count
    self.tokenizer = tokenizer
    self.seed = int(seed)
    self.train = bool(train)
    self.options = augment_options(config)
    self.shuffle_buffer = int(_field(config, "shuffle_buffer", 1024))
    self.num_parallel_calls = int(_field(config, "num_parallel_calls", tf.data.AUTOTUNE))
    self.cycle_length = int(_field(config, "cycle_length", 4))
    self.prefetch = int(_field(config, "prefetch", 2))
    manifest = shards.read_manifest(self.directory)
    self.tasks = _check_tasks(tasks, manifest, self.directory)
    self._select_shards(manifest)
    self._batches = 0
    self._iterator = None
    self.last_keys: list[str] = []

  def _select_shards(self, manifest: Mapping) -> None:
    """This process's files, the manifest-order index of their first record, and a record filter."""
    paths = shards.shard_paths(self.directory, manifest)
    counts = [int(s["num_records"]) for s in manifest["shards"]]
    if not paths:
      raise cli.UserError(f"{self.directory}: the manifest lists no shards")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    self._filter_records = len(paths) < self.process_count
    if self._filter_records:
      chosen = range(len(paths))
      mine = np.arange(sum(counts)) % self.process_count == self.process_index
      self.local_records_per_epoch = int(mine.sum())
    else:
      chosen = range(self.process_index, len(paths), self.process_count)
      self.local_records_per_epoch = sum(counts[i] for i in chosen)
    if self.local_records_per_epoch == 0:
      raise cli.UserError(f"{self.directory}: process {self.process_index} of {self.process_count} "
                       f"gets no records (the manifest lists {sum(counts)} in {len(paths)} shards)")
    self._paths = [paths[i] for i in chosen]
    self._starts = [int(starts[i]) for i in chosen]

  # -- tf.data graph ---------------------------------------------------------------------------

  def _read_shard(self, path, start):
    records_ds = tf.data.TFRecordDataset(path).enumerate(start)
    if self._filter_records:
      count, index = self.process_count, self.process_index
      records_ds = records_ds.filter(lambda i, _: i % count == index)
    return records_ds.map(lambda _, serialized: (path, serialized))

  def _epoch(self, epoch):
    """(shard path, serialized record) of one epoch, shuffled with seeds derived from the epoch."""
    order = tf.range(len(self._paths))
    if self.train:
      file_seed = tf.stack([tf.constant(_derived_seed(self.seed, 1), tf.int64), epoch])
      order = tf.argsort(tf.random.stateless_uniform([len(self._paths)], file_seed))
    files = tf.data.Dataset.from_tensor_slices(
        (tf.gather(self._paths, order), tf.gather(tf.constant(self._starts, tf.int64), order)))
    cycle = min(self.cycle_length, len(self._paths))
    stream = files.interleave(self._read_shard, cycle_length=cycle, block_length=1,
                              num_parallel_calls=cycle, deterministic=True)
    if self.train:
      record_seed = tf.stack(
          [tf.constant(_derived_seed(self.seed, 2, self.process_index), tf.int64), epoch])
      stream = stream.shuffle(self.shuffle_buffer, seed=tf.random.stateless_uniform(
          [], record_seed, minval=None, maxval=None, dtype=tf.int64))
    return stream

  def _record_stream(self, start: int) -> tf.data.Dataset:
    """(position, path, serialized) of this process's stream from `start` on; cheap to skip."""
    epochs = tf.data.Dataset.range(2**62 if self.train else 1)
    stream = epochs.flat_map(self._epoch).enumerate()
    return stream.skip(start).map(lambda position, item: (position, item[0], item[1]))

  def _decode(self, position, path, serialized):
    del path  # carried for error messages only
    seed = augment.example_seed(_derived_seed(self.seed, 3, self.process_index), position)
    return decode_and_augment(serialized, seed, self.tasks, self.options, self.train)

  def dataset(self, start_batch: int = 0) -> tf.data.Dataset:
    """Batched tensors (with `key` and `text`, before tokenization) from batch `start_batch` on."""
    stream = self._record_stream(start_batch * self.local_batch_size)
    batches = stream.map(self._decode, num_parallel_calls=self.num_parallel_calls,
                         deterministic=True)
    batches = batches.batch(self.local_batch_size, drop_remainder=self.train)
    options = tf.data.Options()
    options.deterministic = True
    return batches.prefetch(self.prefetch).with_options(options)

  # -- Python iteration ------------------------------------------------------------------------

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self.dataset(self._batches).as_numpy_iterator()
    try:
      batch = next(self._iterator)
    except tf.errors.OpError as error:
      self._raise_bad_record(error)
    self._batches += 1
    self.last_keys = [key.decode("utf-8") for key in batch.pop("key")]
    batch["tokens"] = self._tokenize(batch.pop("text"))
    return batch

  def _tokenize(self, texts: np.ndarray) -> np.ndarray:
    tokens = np.asarray(self.tokenizer.encode([t.decode("utf-8") for t in texts]))
    if tokens.ndim != 2 or tokens.shape[0] != len(texts):
      raise ValueError(f"tokenizer.encode of {len(texts)} captions expected an array "
                       f"({len(texts)}, L), found shape {tokens.shape}")
    return tokens.astype(np.int32)

  def _raise_bad_record(self, error: tf.errors.OpError):
    """Finds the record of the failing batch that does not decode and names its shard and key."""
    start = self._batches * self.local_batch_size
    # Prefetching may surface an error a little early: look a few batches ahead.
    suspects = self._record_stream(start).take(4 * self.local_batch_size)
    for position, path, serialized in suspects:
      try:
        self._decode(position, path, serialized)
      except tf.errors.OpError as bad:
        raise records.RecordError(
            f"{path.numpy().decode()}: record {_record_key(serialized)!r} (position "
            f"{int(position)} of process {self.process_index}'s stream) does not decode: "
            f"{bad.message.strip()}") from error
    raise error

  def counters(self) -> dict[str, float]:
    """Data counters for the metrics row: epochs of this process's records consumed so far."""
    examples = self._batches * self.local_batch_size
    return {"data/epoch": examples / self.local_records_per_epoch}

  def get_state(self) -> dict:
    """JSON-able position of the stream (the `data` item of the checkpoint)."""
    return {"version": STATE_VERSION, "seed": self.seed, "batches_yielded": self._batches,
            "global_batch_size": self.global_batch_size, "process_count": self.process_count,
            "process_index": self.process_index}

  def set_state(self, state: Mapping) -> None:
    """Continues from `state`. Exact when the seed, batch size and process count are the same."""
    if state.get("loader", "tfdata") != "tfdata":
      raise cli.UserError(f"the checkpoint's data state is from the {state.get('loader')!r} "
                          "loader; set config.data.loader to it to resume this run")
    if int(state["seed"]) != self.seed:
      raise ValueError(f"data state seed {state['seed']} does not match the pipeline seed "
                       f"{self.seed}; build the pipeline with the seed of the run it resumes")
    batches = int(state["batches_yielded"])
    same_layout = (int(state["global_batch_size"]) == self.global_batch_size
                   and int(state["process_count"]) == self.process_count)
    if not same_layout:
      # Other per-process streams: keep the number of examples seen, not the exact order.
      batches = batches * int(state["global_batch_size"]) // self.global_batch_size
      logging.warning("data state from global batch %s on %s processes resumed at global batch "
                      "%s on %s processes: continuing after the same number of examples, not "
                      "the same stream", state["global_batch_size"], state["process_count"],
                      self.global_batch_size, self.process_count)
    self._batches = batches
    self._iterator = None

  def close(self) -> None:
    self._iterator = None

