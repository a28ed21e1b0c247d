"""The grain input pipeline: random access into the pseudo-label shards, a global shuffle,
per-process reading, decoding + joint augmentation + tokenization in worker processes, and a
checkpointable iterator that resumes exactly and in constant time.

  records (every source, manifest order; `random_access.ShardRecords`)
    -> per source: shuffle (reseeded each epoch from seed and epoch) and repeat
    -> mixture of the sources by weight (one source: itself)
    -> decode + augment + tokenize, seeded by the example's position in the global stream
    -> this process's block of every global batch (`ProcessBlocks`), so the global batch the
       step sees is the same run of the stream whatever the process count
    -> skip bad records (counted; too many stop the run) -> local batches
    -> `num_workers` worker processes (0: threads in this process), prefetch

Every stage before batching is a grain `MapDataset`, so the iterator's position is an index:
restoring it costs the same at the start and at the end of an epoch, and epoch e of a restarted
run is shuffled exactly as in an uninterrupted one. Images leave the workers as uint8 and are
normalized on the device. Workers import NumPy, Pillow, protobuf and tokenizers, not TensorFlow.

Data config fields (config.data): directory, or sources (name -> {directory, weight}); image_size,
label_size (image_size), max_boxes (16), crop_scale ((0.5, 1)), crop_ratio ((3/4, 4/3)),
flip_probability (0.5), min_box_area_fraction (0.25), color_jitter (0: off; s scales brightness,
contrast and saturation by [1-s, 1+s]), num_workers (2), worker_buffer (2 batches per worker),
threads (2, decode threads when num_workers is 0), max_bad_fraction (0.001).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Mapping, Sequence

import grain
import numpy as np
from PIL import Image

from clipzoo_jax import cli
from clipzoo_jax import tasks as task_lib
from clipzoo_jax.data import augment_np, example_proto, random_access, records, shards

STATE_VERSION = 2
REQUIRED_FEATURES = ("key", "image/encoded", "text")
_BAD = "_bad"          # an item that is a bad record: its description
_SKIPPED = "_skipped"  # on a good example: bad records skipped just before it
_NOTES = "_notes"      # ... and their descriptions, one per line


# ---------------------------------------------------------------------------------------------
# Dealing the global stream out to the processes.


class ProcessBlocks(grain.MapDataset):
  """This process's share of the global stream from position `start`, in the order its loader
  workers read it.

  Of every global batch (`local_batch` x `process_count` consecutive examples) the process takes
  the `process_index`-th block of `local_batch`. Its local batch n is then the n-th such block,
  and the processes' local batches stacked in process order (as
  `jax.make_array_from_process_local_data` stacks them) are exactly the global batch one process
  would read. grain's worker w reads every `num_workers`-th element of this dataset and batches
  what it reads, and the workers' batches are yielded in turn; so element q is placed where
  worker q % num_workers needs it for its share of whole local batches. The batches are then the
  same whatever the process and worker counts, and so are a run's numbers.

  A finite stream (evaluation) keeps the plain block order: its last global batch is partial.
  """

  def __init__(self, parent: grain.MapDataset, start: int, local_batch: int, process_index: int,
               process_count: int, num_workers: int = 0):
    super().__init__(parent)
    self._start, self._local = int(start), int(local_batch)
    self._index, self._count = int(process_index), int(process_count)
    remaining = max(len(parent) - self._start, 0)
    self._infinite = len(parent) >= sys.maxsize
    self._workers = max(int(num_workers), 1) if self._infinite else 1
    if self._infinite:
      self._length = remaining // (self._local * self._count * self._workers) * self._local
    else:
      full, rest = divmod(remaining, self._local * self._count)
      self._length = full * self._local + min(max(rest - self._index * self._local, 0),
                                              self._local)

  def __len__(self) -> int:
    return self._length

  def position(self, index: int) -> int:
    """The global stream position of this dataset's `index`-th element."""
    read, worker = divmod(int(index), self._workers)       # the worker's `read`-th element
    worker_batch, offset = divmod(read, self._local)
    batch = worker_batch * self._workers + worker            # this process's local batch
    return self._start + (batch * self._count + self._index) * self._local + offset

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self.position(index)]

  def __str__(self) -> str:
    return (f"ProcessBlocks(start={self._start}, local_batch={self._local}, "
            f"process={self._index}/{self._count}, workers={self._workers})")


# ---------------------------------------------------------------------------------------------
# Per-example work, run in the workers.


class DecodeExample:
  """(position in the global stream, source item) -> one example of the batch contract plus its
  key, or a bad-record marker. Picklable: grain sends it to its worker processes."""

  def __init__(self, tasks: Sequence[str], options, train: bool, seed: int, tokenizer,
               color_jitter: float = 0.0):
    self.tasks = tuple(tasks)
    self.options = options
    self.train = bool(train)
    self.seed = int(seed)
    self.tokenizer = tokenizer
    self.color_jitter = float(color_jitter)

  def __call__(self, position: int, item):
    if isinstance(item, random_access.BadRecord):
      return {_BAD: item.describe()}
    shard, serialized = item
    key = "<unparsed>"
    try:
      features = example_proto.parse(serialized)
      if features.get("key"):
        key = features["key"][0].decode("utf-8", "replace")
      return self.decode(position, key, features)
    except Exception as error:  # noqa: BLE001  (any broken record is skipped and reported)
      return {_BAD: f"{shard}: record {key!r}: {type(error).__name__}: {error}"}

  def decode(self, position: int, key: str, features: Mapping) -> dict:
    missing = [name for name in REQUIRED_FEATURES if not features.get(name)]
    if missing:
      raise ValueError(f"required features {missing} missing; found {sorted(features)}")
    with Image.open(io.BytesIO(features["image/encoded"][0])) as image:
      image = image.convert("RGB")
    image_hw = (image.height, image.width)
    rng = augment_np.example_rng(self.seed, position)
    window, flip = augment_np.sample_window_and_flip(rng, image_hw, self.options, self.train)
    pixels = augment_np.crop_resize_image(image, window, self.options.image_size, flip)
    if self.train and self.color_jitter > 0:
      pixels = augment_np.color_jitter(pixels, rng, self.color_jitter)
    out = {"key": np.str_(key), "image": pixels}
    for task in task_lib.get_all(self.tasks):
      out.update(task.decode_numpy(features, window, flip, self.options, image_hw))
    text = features["text"][0].decode("utf-8")
    out["tokens"] = np.asarray(self.tokenizer.encode([text])[0], np.int32)
    return out


class _SkipBad(grain.IterDataset):
  """Drops bad-record markers; the next good example carries how many were dropped before it and
  their descriptions, so the counts survive batching and worker processes."""

  def __iter__(self):
    return _SkipBadIterator(self._parent.__iter__())


class _SkipBadIterator(grain.DatasetIterator):

  def __next__(self):
    notes = []
    while True:
      try:
        item = next(self._parent)
      except StopIteration:
        for note in notes:  # bad records at the very end of a finite (eval) pass
          logging.warning("data: skipped a bad record at the end of the pass: %s", note)
        raise
      if _BAD in item:
        notes.append(item[_BAD])
        continue
      item[_SKIPPED] = np.int64(len(notes))
      item[_NOTES] = np.str_("\n".join(notes))
      return item

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


# ---------------------------------------------------------------------------------------------
# Configuration.


def _sources(config) -> list[tuple[str, float]]:
  """(directory, weight) of each source: `data.sources` or the single `data.directory`."""
  sources = config.get("sources", None)
  if not sources:
    return [(str(_field(config, "directory")), 1.0)]
  out = []
  for name, source in dict(sources).items():
    source = dict(source)
    if "directory" not in source:
      raise cli.UserError(f"config.data.sources.{name}: 'directory' is required; found "
                          f"{sorted(source)}")
    weight = float(source.get("weight", 1.0))
    if not weight > 0:
      raise cli.UserError(f"config.data.sources.{name}.weight: expected > 0, found {weight}")
    out.append((str(source["directory"]), weight))
  return out


_field = augment_np.field


class GrainPipeline:
  """Per-process iterator of NumPy batches following the batch contract of the train step.

  Same interface as the tf.data `loader.InputPipeline`: iterate for batches, `last_keys`,
  `counters()`, `get_state()` / `set_state()`, `close()`.
  """

  def __init__(self, config, tokenizer, global_batch_size: int, tasks: Sequence[str],
               seed: int = 0, process_index: int = 0, process_count: int = 1,
               train: bool = True):
    self.process_index, self.process_count = int(process_index), int(process_count)
    if global_batch_size % self.process_count:
      raise cli.UserError(f"global batch size {global_batch_size} does not divide by the process "
                          f"count {self.process_count}")
    self.global_batch_size = int(global_batch_size)
    self.local_batch_size = self.global_batch_size // self.process_count
    self.seed, self.train = int(seed), bool(train)
    self.options = augment_np.augment_options(config)
    self.num_workers = int(_field(config, "num_workers", 2))
    self.worker_buffer = int(_field(config, "worker_buffer", 2))
    self.threads = int(_field(config, "threads", 2))
    self.max_bad_fraction = float(_field(config, "max_bad_fraction", 0.001))
    color_jitter = float(_field(config, "color_jitter", 0.0))
    for name, value in (("num_workers", self.num_workers), ("threads", self.threads),
                        ("max_bad_fraction", self.max_bad_fraction), ("color_jitter", color_jitter)):
      if value < 0:
        raise cli.UserError(f"config.data.{name}: expected >= 0, found {value}")
    self.sources, weights, found_tasks = [], [], set()
    for directory, weight in _sources(config):
      manifest = shards.read_manifest(directory)
      found_tasks |= set(manifest.get("tasks", {}))
      self.sources.append(random_access.ShardRecords(directory, manifest))
      weights.append(weight)
    for task in tasks:
      task_lib.get(task, "loader tasks")
      if task not in found_tasks:
        raise cli.UserError(f"task {task!r} is not in the dataset "
                            f"{', '.join(s.directory for s in self.sources)} (manifest tasks: "
                            f"{sorted(found_tasks)})")
    self.tasks = tuple(tasks)
    self.weights = [w / sum(weights) for w in weights]
    self.records_per_epoch = sum(len(s) for s in self.sources)
    if not self.train and self.records_per_epoch < self.process_count:
      raise cli.UserError(f"{self.sources[0].directory}: {self.records_per_epoch} records for "
                          f"{self.process_count} processes")
    self._decode = DecodeExample(self.tasks, self.options, self.train,
                                 _mix_seed(self.seed, 3), tokenizer, color_jitter)
    self._batches = 0
    self._skipped = 0
    self._start = 0  # the global stream position this layout began reading at
    self._iterator = None
    self._pending_state = None
    self.last_keys: list[str] = []
    self.last_skipped: list[str] = []

  # -- the grain graph -------------------------------------------------------------------------

  def _stream(self) -> grain.MapDataset:
    """Every example of the global stream, in order (lazy; random access by position)."""
    parts = []
    for number, source in enumerate(self.sources):
      part = grain.MapDataset.source(source)
      if self.train:
        part = part.shuffle(seed=_mix_seed(self.seed, 1, number) % 2**31).repeat(None)
      parts.append(part)
    if len(parts) == 1:
      stream = parts[0]
    elif self.train:
      stream = grain.MapDataset.mix(parts, self.weights)
    else:
      stream = grain.MapDataset.concatenate(parts)
    return stream.map_with_index(self._decode)

  def dataset(self) -> grain.IterDataset:
    local = ProcessBlocks(self._stream(), self._start, self.local_batch_size,
                          self.process_index, self.process_count, self.num_workers)
    read = grain.ReadOptions(num_threads=self.threads if self.num_workers == 0 else 1,
                             prefetch_buffer_size=max(1, self.local_batch_size))
    batches = _SkipBad(local.to_iter_dataset(read)).batch(self.local_batch_size,
                                                          drop_remainder=self.train)
    if self.num_workers > 0:
      _absl_flags_ready()
      batches = batches.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.num_workers, per_worker_buffer_size=self.worker_buffer),
          worker_init_fn=_worker_init)
    return batches

  # -- iteration -------------------------------------------------------------------------------

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = iter(self.dataset())
      if self._pending_state is not None:
        self._iterator.set_state(self._pending_state)
        self._pending_state = None
    batch = next(self._iterator)
    self._batches += 1
    self.last_keys = [str(key) for key in batch.pop("key")]
    skipped = int(batch.pop(_SKIPPED).sum())
    notes = [line for note in batch.pop(_NOTES) for line in str(note).split("\n") if line]
    self.last_skipped = notes
    if skipped:
      self._skipped += skipped
      for note in notes:
        logging.warning("data: skipped a bad record: %s", note)
      self._check_bad_fraction(notes[-1])
    return batch

  def _check_bad_fraction(self, latest: str) -> None:
    consumed = self._batches * self.local_batch_size + self._skipped
    fraction = self.max_bad_fraction
    # Judged over at least 1/fraction records, so one early bad record does not stop a run.
    allowed = fraction * max(consumed, math.ceil(1 / fraction) if fraction > 0 else 0)
    if self._skipped > allowed:
      raise records.RecordError(
          f"data: {self._skipped} bad records among the {consumed} this process read, more than "
          f"config.data.max_bad_fraction={fraction}; the latest: {latest}")

  def counters(self) -> dict[str, float]:
    """Data counters for the metrics row: epochs consumed (of all sources) and records skipped."""
    examples = self._batches * self.local_batch_size * self.process_count
    return {"data/epoch": examples / self.records_per_epoch, "data/skipped": float(self._skipped)}

  # -- checkpointing ---------------------------------------------------------------------------

  def _local_state(self) -> dict:
    if self._iterator is not None:
      iterator = self._iterator.get_state()
    else:
      iterator = self._pending_state
    return {"batches_yielded": self._batches, "skipped": self._skipped,
            "iterator": None if iterator is None else json.dumps(iterator, sort_keys=True)}

  def get_state(self) -> dict:
    """JSON-able position of every process's stream (the `data` item of the checkpoint).

    In a multi-process run this is collective: each process's iterator state is gathered so
    that the one checkpoint item holds them all."""
    local = self._local_state()
    states = _allgather_json(local, self.process_index, self.process_count)
    return {"version": STATE_VERSION, "loader": "grain", "seed": self.seed, "start": self._start,
            "records_per_epoch": self.records_per_epoch, **self._layout(), "processes": states}

  def _layout(self) -> dict:
    return {"global_batch_size": self.global_batch_size, "process_count": self.process_count,
            "num_workers": self.num_workers}

  def set_state(self, state: Mapping) -> None:
    """Continues from `state`: exactly, with the same seed, data, batch size, process and worker
    counts; after a change of batch size, process count or worker count, at the first example of
    the global stream that the saved run had not read (logged)."""
    if int(state.get("version", 0)) != STATE_VERSION or state.get("loader") != "grain":
      raise cli.UserError(f"the checkpoint's data state is from another loader (version "
                          f"{state.get('version')}, loader {state.get('loader', 'tfdata')!r}); "
                          f"set config.data.loader to that loader to resume this run")
    if int(state["seed"]) != self.seed:
      raise ValueError(f"data state seed {state['seed']} does not match the pipeline seed "
                       f"{self.seed}; build the pipeline with the seed of the run it resumes")
    if int(state["records_per_epoch"]) != self.records_per_epoch:
      raise cli.UserError(f"the data state was saved over {state['records_per_epoch']} records per "
                          f"epoch; these sources have {self.records_per_epoch}. Resume with the "
                          "same data (or start a new workdir)")
    self.close()
    processes = state["processes"]
    if {k: int(state[k]) for k in self._layout()} == self._layout():
      mine = processes[self.process_index]
      self._start = int(state["start"])
      self._batches, self._skipped = int(mine["batches_yielded"]), int(mine["skipped"])
      self._pending_state = None if mine["iterator"] is None else json.loads(mine["iterator"])
      return
    # Another layout: the saved per-worker positions do not apply. Every saved process read
    # `batches_yielded` local batches, its blocks of as many global batches, plus its skipped
    # records.
    batches = int(processes[0]["batches_yielded"])
    skipped = sum(int(p["skipped"]) for p in processes)
    self._start = int(state["start"]) + batches * int(state["global_batch_size"]) + skipped
    self._batches = self._start // self.global_batch_size  # for data/epoch
    self._skipped, self._pending_state = 0, None
    logging.warning(
        "data: the checkpoint was saved with %s; this run has %s. Continuing the global stream "
        "at example %d, the first the saved run had not read (exact when no record was skipped)",
        {k: state[k] for k in self._layout()}, self._layout(), self._start)

  def close(self) -> None:
    """Stops the worker processes (also on garbage collection)."""
    iterator, self._iterator = self._iterator, None
    if iterator is not None and hasattr(iterator, "close"):
      iterator.close()


def _worker_init(worker_index: int, worker_count: int) -> None:
  """In each worker process: a SIGTERM or Ctrl-C sent to the whole process group (a VM shutdown,
  a terminal) must reach the trainer only, which saves, stops after a few more batches and closes
  the workers itself; and a worker exits by itself when the trainer is gone (e.g. SIGKILL), so no
  orphan keeps its memory."""
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  parent = os.getppid()

  def exit_with_parent():
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(0)  # pylint: disable=protected-access

  threading.Thread(target=exit_with_parent, daemon=True, name="exit-with-parent").start()


def _absl_flags_ready() -> None:
  """grain's worker processes read absl flags; outside an absl app (tests, notebooks) they are
  not parsed, so the defaults are taken as parsed."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _mix_seed(*parts: int) -> int:
  words = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(2, np.uint32)
  return (int(words[0]) << 31) | (int(words[1]) >> 1)


def _allgather_json(local: dict, process_index: int, process_count: int) -> list:
  """Every process's `local` (JSON-able), in process order. Single-process pipelines (also the
  simulated processes of tests) return a list with `local` at its own index."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    states = [None] * process_count
    states[process_index] = local
    return states
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  data = np.frombuffer(json.dumps(local).encode("utf-8"), np.uint8)
  lengths = multihost_utils.process_allgather(np.int64(len(data)))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:len(data)] = data
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:int(n)]).decode("utf-8")) for row, n in zip(gathered, lengths)]
