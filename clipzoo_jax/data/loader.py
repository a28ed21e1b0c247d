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
from jax.sharding import NamedSharding, PartitionSpec

from clipzoo_jax.data import augment, records, shards

STATE_VERSION = 1
_REQUIRED = object()
_NO_KEY = "<no key>"


# ---------------------------------------------------------------------------------------------
# Configuration.


def _field(config, name: str, default=_REQUIRED):
  """A data-config field from a dict or an ml_collections ConfigDict."""
  value = config.get(name, None) if hasattr(config, "get") else getattr(config, name, None)
  if value is None:
    if default is _REQUIRED:
      raise ValueError(f"data config: field {name!r} is required; found fields "
                       f"{sorted(config.keys()) if hasattr(config, 'keys') else config}")
    return default
  return value


def _pair(config, name: str, default) -> tuple[float, float]:
  value = tuple(float(v) for v in _field(config, name, default))
  if len(value) != 2:
    raise ValueError(f"data config: field {name!r} expected (low, high), found {value}")
  return value


def augment_options(config) -> augment.AugmentOptions:
  image_size = int(_field(config, "image_size"))
  return augment.AugmentOptions(
      image_size=image_size,
      label_size=int(_field(config, "label_size", image_size)),
      max_boxes=int(_field(config, "max_boxes", 16)),
      crop_scale=_pair(config, "crop_scale", (0.5, 1.0)),
      crop_ratio=_pair(config, "crop_ratio", (3 / 4, 4 / 3)),
      flip_probability=float(_field(config, "flip_probability", 0.5)),
      min_box_area_fraction=float(_field(config, "min_box_area_fraction", 0.25)),
      antialias=bool(_field(config, "antialias", False)))


def _derived_seed(*parts: int) -> int:
  """A well-mixed non-negative int64 seed from integers: seed 1 and seed 2 streams are unrelated."""
  words = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(2, np.uint32)
  return (int(words[0]) << 31) | (int(words[1]) >> 1)


# ---------------------------------------------------------------------------------------------
# Decoding of the stored label codecs (the TF twins of records.decode_*), applied after nearest
# resampling: per-pixel decoding commutes with it and the resampled arrays are smaller.


# Absent labels decode a 1x1 stand-in (then masked), so the graph needs no tf.cond per task.
_ABSENT_PNG_U8 = {1: records.encode_png(np.zeros((1, 1), np.uint8)),
                  3: records.encode_png(np.zeros((1, 1, 3), np.uint8))}
_ABSENT_PNG_U16 = records.encode_png(np.zeros((1, 1), np.uint16))


def _png_or_stand_in(encoded, stand_in: bytes):
  present = tf.strings.length(encoded) > 0
  return tf.where(present, encoded, stand_in), present


def _png_bit_depth(png):
  """Byte 24 of a PNG (in the IHDR chunk) is its bit depth."""
  return tf.io.decode_raw(tf.strings.substr(png, 24, 1), tf.uint8)[0]


def _seg_classes(png, window, flip, size: int):
  """Resampled class map, int32, -1 where ignored (255 in 8-bit PNGs, 65535 in 16-bit ones)."""
  # decode_png(dtype=uint16) scales 8-bit values by 257: 8-bit ignore 255 becomes 65535 too.
  steps = tf.io.decode_png(png, channels=1, dtype=tf.uint16)[..., 0]
  steps = tf.cast(augment.augment_dense(steps, window, flip, size), tf.int32)
  classes = tf.where(tf.equal(_png_bit_depth(png), 8), steps // 257, steps)
  return tf.where(steps == records.SEG_IGNORE_U16, -1, classes)


def _normals_from_pixels(pixels):
  valid = tf.reduce_any(pixels != 0, axis=-1, keepdims=True)
  xyz = tf.cast(pixels, tf.float32) / 127.5 - 1.0
  return tf.where(valid, augment.unit_normals(xyz), 0.0)


def _parse_spec(tasks: Sequence[str]) -> dict:
  spec = {
      "key": tf.io.FixedLenFeature([], tf.string),
      "image/encoded": tf.io.FixedLenFeature([], tf.string),
      "text": tf.io.FixedLenFeature([], tf.string),
  }
  for task in ("seg", "depth", "normals"):
    if task in tasks:
      spec[f"{task}/encoded"] = tf.io.FixedLenFeature([], tf.string, default_value="")
  if "depth" in tasks:
    spec["depth/scale"] = tf.io.FixedLenFeature([], tf.float32, default_value=0.0)
  if "det" in tasks:
    spec["det/boxes"] = tf.io.VarLenFeature(tf.float32)
    spec["det/classes"] = tf.io.VarLenFeature(tf.int64)
    spec["det/scores"] = tf.io.VarLenFeature(tf.float32)
    spec["det/count"] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
  return spec


def decode_and_augment(serialized, seed, tasks: Sequence[str], options: augment.AugmentOptions,
                       train: bool) -> dict:
  """One serialized record to the per-example tensors of the batch contract (+ key and text)."""
  parsed = tf.io.parse_single_example(serialized, _parse_spec(tasks))
  # The accurate IDCT gives PIL's pixels (the experts saw those); TF's default differs by ~4 levels.
  image = tf.io.decode_jpeg(parsed["image/encoded"], channels=3, dct_method="INTEGER_ACCURATE")
  window, flip = augment.sample_window_and_flip(seed, tf.shape(image)[:2], options, train)
  size = options.label_size
  out = {"key": parsed["key"], "text": parsed["text"],
         "image": augment.augment_image(image, window, flip, options.image_size,
                                        options.antialias)}
  if "seg" in tasks:
    png, present = _png_or_stand_in(parsed["seg/encoded"], _ABSENT_PNG_U8[1])
    out["seg"] = tf.where(present, _seg_classes(png, window, flip, size), -1)
    out["seg_mask"] = tf.cast(present, tf.float32)
  if "depth" in tasks:
    png, present = _png_or_stand_in(parsed["depth/encoded"], _ABSENT_PNG_U16)
    steps = augment.augment_dense(tf.io.decode_png(png, dtype=tf.uint16)[..., 0], window, flip,
                                  size)
    out["depth"] = tf.where(present, tf.cast(steps, tf.float32) * parsed["depth/scale"], 0.0)
    out["depth_mask"] = tf.cast(present, tf.float32)
  if "normals" in tasks:
    png, present = _png_or_stand_in(parsed["normals/encoded"], _ABSENT_PNG_U8[3])
    pixels = augment.augment_dense(tf.io.decode_png(png, channels=3), window, flip, size)
    normals = augment.mirror_normals(_normals_from_pixels(pixels), flip)
    out["normals"] = tf.where(present, normals, 0.0)
    out["normals_mask"] = tf.cast(present, tf.float32)
  if "det" in tasks:
    classes = tf.sparse.to_dense(parsed["det/classes"])
    boxes = tf.reshape(tf.sparse.to_dense(parsed["det/boxes"]), [-1, 4])
    scores = tf.sparse.to_dense(parsed["det/scores"])
    out["det_boxes"], out["det_classes"] = augment.augment_boxes(
        boxes, classes, scores, window, flip, options)
    # det/count marks a label with zero boxes; older records only show presence by their boxes.
    present = (parsed["det/count"] >= 0) | (tf.size(classes) > 0)
    out["det_mask"] = tf.cast(present, tf.float32)
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
    if task not in records.TASKS:
      raise ValueError(f"task {task!r} is not in the record schema; expected one of "
                       f"{list(records.TASKS)}")
    if task not in found:
      raise ValueError(f"task {task!r} is not in the dataset {directory} (manifest tasks: {found})")
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
      raise ValueError(f"global batch size {global_batch_size} does not divide by the process "
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
      raise ValueError(f"{self.directory}: the manifest lists no shards")
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
      raise ValueError(f"{self.directory}: process {self.process_index} of {self.process_count} "
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

  def get_state(self) -> dict:
    """JSON-able position of the stream (the `data` item of the checkpoint)."""
    return {"version": STATE_VERSION, "seed": self.seed, "batches_yielded": self._batches,
            "global_batch_size": self.global_batch_size, "process_count": self.process_count,
            "process_index": self.process_index}

  def set_state(self, state: Mapping) -> None:
    """Continues from `state`. Exact when the seed, batch size and process count are the same."""
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


def to_global_batch(local: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                    batch_partition: str | Sequence[str] = ("data", "fsdp")) -> dict[str, jax.Array]:
  """Global jax.Arrays from each process's local batch, sharded over the leading axis."""
  partition = tuple(batch_partition) if not isinstance(batch_partition, str) else batch_partition
  sharding = NamedSharding(mesh, PartitionSpec(partition))
  return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for name, value in local.items()}
