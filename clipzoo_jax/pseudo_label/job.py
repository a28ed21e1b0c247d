"""The pseudo-labelling job: corpus -> experts -> TFRecord shards + manifest, sharded and resumable.

The unit of work is an output shard = one slice of the corpus plan (fixed in `plan.json` by the
first worker). Worker w of n takes shards i with i % n == w; complete shards are skipped, partial
ones removed and redone, so a job killed at any moment and rerun writes every key exactly once.
Per shard three stages overlap: a reader thread reads raw pairs and hands batches to a decode
pool (image decode + each expert's `prepare`), the main thread runs the experts, and a writer
thread encodes labels and writes records (`ShardLabeller`). The last worker to finish writes the
manifest. `ray_runner` hands the same shards to a Ray cluster's workers through `ShardLabeller`.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import queue
import threading
import time
from concurrent import futures
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from clipzoo_jax import atomic_files, cli
from clipzoo_jax import tasks as task_lib
from clipzoo_jax.data import records, shards
from clipzoo_jax.experts import base
from clipzoo_jax.pseudo_label import corpus as corpus_lib
from clipzoo_jax.pseudo_label import report

PLAN_NAME = "plan.json"
ON_EXPERT_ERROR = ("stop", "skip")


class JobError(cli.UserError):
  """The output directory belongs to a different job; the message names the field and values."""


class ExpertRunError(JobError):
  """An expert failed on a batch; the message names the expert, the shard and the records' keys."""

  def __init__(self, task: str, expert: base.Expert, keys: Sequence[str], cause: Exception,
               shard: str | None = None):
    self.task, self.expert, self.keys, self.cause = task, expert, list(keys), cause
    where = f" in shard {shard}" if shard else ""
    shown = ", ".join(repr(k) for k in self.keys[:3]) + (", ..." if len(self.keys) > 3 else "")
    super().__init__(
        f"expert {task} ({expert.kind} from {expert.source!r}) failed on {len(self.keys)} "
        f"records{where} (keys {shown}): {report.describe(cause)}. To list the records it fails on "
        "in bad_inputs.json and go on, set --config.job.on_expert_error=skip")

  def in_shard(self, shard: str) -> "ExpertRunError":
    return ExpertRunError(self.task, self.expert, self.keys, self.cause, shard)

  def __reduce__(self):
    # Pickled (from a Ray worker to the driver) as a JobError with the same message: the expert
    # holds a model, and the default pickle would rebuild this class from its message alone.
    return JobError, (str(self),)


@dataclasses.dataclass
class JobOptions:
  batch_size: int = 16
  decode_threads: int = 2
  prefetch_batches: int = 4      # batches read/decoded ahead of the experts; batches queued to write
  split: str = "train"           # shard file prefix
  jpeg_quality: int = 95         # only for sources that are not JPEG already
  progress_every_s: float = 10.0
  # An expert raising in its forward pass: "stop" the job naming expert, shard and keys, or "skip":
  # label the batch's records one by one and list those it still fails on as bad inputs.
  on_expert_error: str = "stop"

  def __post_init__(self):
    if self.on_expert_error not in ON_EXPERT_ERROR:
      raise JobError(f"config.job.on_expert_error: expected one of {list(ON_EXPERT_ERROR)}, "
                     f"found {self.on_expert_error!r}")


@dataclasses.dataclass
class Decoded:
  key: str
  jpeg: bytes
  caption: str
  image: np.ndarray
  prepared: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Plan: the corpus split into slices, fixed once per output directory.


def manifest_entries(experts: Mapping[str, base.Expert]) -> dict[str, dict]:
  """Each expert's manifest entry (weights and config-file checksums, dtype, thresholds, label
  resolution, ...), by task. Not the device."""
  return {task: expert.manifest_entry() for task, expert in experts.items()}


def job_identity(corpus: corpus_lib.Corpus, entries: Mapping[str, dict], split: str) -> dict:
  """Everything that decides the records: corpus, split, and the experts' `manifest_entries`."""
  return {"corpus": corpus.describe(), "split": split, "experts": dict(entries)}


def differences(expected: Any, found: Any, path: str = "") -> list[str]:
  """'path: expected X, found Y' for each leaf where two JSON values differ."""
  if isinstance(expected, dict) and isinstance(found, dict):
    lines = []
    for name in list(expected) + [n for n in found if n not in expected]:
      where = f"{path}.{name}" if path else str(name)
      if name not in found:
        lines.append(f"{where}: expected {json.dumps(expected[name])}, found nothing")
      elif name not in expected:
        lines.append(f"{where}: expected nothing, found {json.dumps(found[name])}")
      else:
        lines += differences(expected[name], found[name], where)
    return lines
  if expected == found:
    return []
  return [f"{path}: expected {json.dumps(expected)}, found {json.dumps(found)}"]


def load_or_write_plan(output_dir: str, corpus: corpus_lib.Corpus, entries: Mapping[str, dict],
                       split: str, settings: Mapping | None = None) -> dict:
  """The directory's plan; written on first use, and on reruns checked against this job.
  `entries`: the experts' `manifest_entries` (a Ray driver gets them from its workers)."""
  path = os.path.join(output_dir, PLAN_NAME)
  identity = json.loads(json.dumps(job_identity(corpus, entries, split)))
  if os.path.exists(path):
    with open(path) as f:
      plan = json.load(f)
    changed = differences({field: plan.get(field) for field in identity}, identity)
    if changed:
      raise JobError(f"{path}: this directory was made by a different job, and resuming would mix "
                     "labels; " + "; ".join(changed) + ". Use a new output directory or the "
                     "original config, models and settings.")
    return plan
  plan = dict(identity, slices=[part.to_json() for part in corpus.plan()],
              settings=json.loads(json.dumps(settings)))
  os.makedirs(output_dir, exist_ok=True)
  atomic_files.write_json(path, plan, indent=1)
  return plan


def shard_names(plan: Mapping) -> list[str]:
  count = len(plan["slices"])
  return [shards.shard_name(plan["split"], i, count) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Stage 1 (decode pool): raw pair -> decoded image + expert inputs, or a bad input.


def decode_item(item: corpus_lib.Item, experts: Mapping[str, base.Expert],
                jpeg_quality: int) -> Decoded | report.BadInput:
  """Never raises for a bad pair. EXIF orientation is ignored, as tf.io.decode_jpeg ignores it."""
  if item.problem:
    return report.BadInput(item.key, item.problem)
  if item.image is None:
    return report.BadInput(item.key, "missing image")
  if not item.caption:
    return report.BadInput(item.key, "missing caption")
  try:
    source = Image.open(io.BytesIO(item.image))
    image = np.asarray(source.convert("RGB"))
  except Exception as e:  # PIL raises many types for corrupt files
    return report.BadInput(item.key, f"undecodable image: {report.describe(e)}")
  # Keep the source JPEG byte-exact; re-encode other formats (and CMYK JPEGs) for the loader.
  keep = source.format == "JPEG" and source.mode in ("RGB", "L")
  jpeg = item.image if keep else records.encode_jpeg(image, jpeg_quality)
  prepared = {}
  for task, expert in experts.items():
    try:
      prepared[task] = expert.prepare(image, item.key)
    except Exception as e:  # e.g. an image too thin for a processor that keeps the aspect ratio
      height, width = image.shape[:2]
      return report.BadInput(item.key, f"image cannot be labelled: expert {task} cannot preprocess "
                                       f"a {height}x{width} image: {report.describe(e)}")
  return Decoded(item.key, jpeg, item.caption, image, prepared)


def _batches(items: Iterator, size: int) -> Iterator[list]:
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


class _Prefetcher:
  """A reader thread submits decode work for upcoming batches; iterating yields them in order."""

  def __init__(self, batches: Iterator[list], decode: Callable, pool: futures.Executor, depth: int):
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._read, args=(batches, decode, pool), daemon=True)
    self._thread.start()

  def _put(self, value) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(value, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _read(self, batches, decode, pool) -> None:
    try:
      for batch in batches:  # one task per item: all decode threads work on every batch
        if not self._put([pool.submit(decode, item) for item in batch]):
          return
      self._put(None)
    except BaseException as e:  # surfaced in the consumer thread
      self._put(e)

  def __iter__(self) -> Iterator[list]:
    while True:
      entry = self._queue.get()
      if entry is None:
        return
      if isinstance(entry, BaseException):
        raise entry
      yield [task.result() for task in entry]

  def close(self) -> None:
    self._stop.set()
    self._thread.join()


# ---------------------------------------------------------------------------------------------
# Stage 2 (main thread): experts. Stage 3 (writer thread): encode and write.


def merge_labels(into: records.Labels, labels: records.Labels, task: str) -> None:
  for field in task_lib.get(task).label_fields:
    setattr(into, field, getattr(labels, field))


def label_batch(experts: Mapping[str, base.Expert], decoded: Sequence[Decoded]) -> list[records.Labels]:
  """All experts over one batch, in dependency order; each sees the labels of those before it."""
  batch = base.Batch([d.key for d in decoded], [d.image for d in decoded],
                     [records.Labels() for _ in decoded])
  for task, expert in experts.items():
    try:
      produced = expert.run([d.prepared[task] for d in decoded], batch)
    except Exception as e:  # noqa: BLE001  (any failure of third-party model code)
      raise ExpertRunError(task, expert, batch.keys, e) from e
    for merged, labels in zip(batch.labels, produced):
      merge_labels(merged, labels, task)
  return batch.labels


def num_seg_classes(experts: Mapping[str, base.Expert]) -> int:
  return len(experts["seg"].classes) if "seg" in experts else 254


def _write_records(writer: shards.ShardWriter, decoded: Sequence[Decoded],
                   labels: Sequence[records.Labels], seg_classes: int) -> None:
  for item, item_labels in zip(decoded, labels):
    writer.write(item.key, records.make_example(item.key, item.jpeg, item.caption, item_labels,
                                                num_seg_classes=seg_classes))


# ---------------------------------------------------------------------------------------------
# Shards and workers


@dataclasses.dataclass
class _Pools:
  decode: futures.ThreadPoolExecutor
  write: futures.ThreadPoolExecutor


def label_shard(path: str, part: corpus_lib.Slice, corpus: corpus_lib.Corpus,
                experts: Mapping[str, base.Expert], options: JobOptions, pools: _Pools,
                progress: report.ShardProgress) -> dict:
  """Writes one complete shard (+ its bad-input report) for `part`; returns the report."""
  shard_report = report.ShardReport(os.path.basename(path), part.to_json())
  seen: set[str] = set()
  decode = lambda item: decode_item(item, experts, options.jpeg_quality)
  started = time.perf_counter()
  with shards.ShardWriter(path) as writer:
    pending: collections.deque = collections.deque()
    prefetcher = _Prefetcher(_batches(corpus.read(part), options.batch_size), decode,
                             pools.decode, options.prefetch_batches)
    try:
      wait = time.perf_counter()
      for decoded in prefetcher:
        shard_report.seconds["wait_input"] += time.perf_counter() - wait
        good = _sort_out(decoded, seen, shard_report)
        if good:
          compute = time.perf_counter()
          good, labels = _label_or_skip(experts, good, options.on_expert_error, shard_report)
          shard_report.seconds["experts"] += time.perf_counter() - compute
          pending.append(pools.write.submit(_write_records, writer, good, labels,
                                            num_seg_classes(experts)))
        wait = time.perf_counter()
        while len(pending) > options.prefetch_batches:
          pending.popleft().result()
        shard_report.seconds["wait_write"] += time.perf_counter() - wait
        progress.add(len(decoded), len(decoded) - len(good))
        wait = time.perf_counter()
      while pending:
        pending.popleft().result()
    finally:
      prefetcher.close()
      futures.wait(pending)  # the writer must be idle before ShardWriter closes the file
    shard_report.written = writer.num_records
    shard_report.seconds["total"] = time.perf_counter() - started
    # Written before the shard's sidecar: a complete shard always has its report.
    atomic_files.write_json(report.shard_report_path(path), shard_report.to_json(), indent=1)
  return shard_report.to_json()


def _label_or_skip(experts: Mapping[str, base.Expert], good: list[Decoded], on_error: str,
                   shard_report: report.ShardReport) -> tuple[list[Decoded], list[records.Labels]]:
  """Labels of a batch; on an expert's failure either stop (naming the shard) or, with "skip",
  label each record alone and move those that still fail into the report."""
  try:
    return good, label_batch(experts, good)
  except ExpertRunError as e:
    if on_error == "stop":
      raise e.in_shard(shard_report.shard) from e.cause
  kept, labels = [], []
  for item in good:
    try:
      labels += label_batch(experts, [item])
      kept.append(item)
    except ExpertRunError as e:
      shard_report.bad.append(report.BadInput(
          item.key, f"expert failed: {e.task} ({e.expert.kind}): {report.describe(e.cause)}"))
  return kept, labels


def _sort_out(decoded: Sequence, seen: set[str], shard_report: report.ShardReport) -> list[Decoded]:
  """Counts a batch, moves bad inputs and repeated keys into the report, returns the good ones."""
  good = []
  for item in decoded:
    shard_report.read += 1
    if isinstance(item, report.BadInput):
      shard_report.bad.append(item)
    elif item.key in seen:
      shard_report.bad.append(report.BadInput(item.key, "duplicate key: already in this shard"))
    else:
      seen.add(item.key)
      good.append(item)
  return good


class ShardLabeller:
  """Writes whole shards with one set of experts and its own decode and write threads. The local
  runner and every Ray worker label through it, so both write the same bytes."""

  def __init__(self, corpus: corpus_lib.Corpus, experts: Mapping[str, base.Expert],
               options: JobOptions):
    import tensorflow  # noqa: F401  (imported now, so the first shard's img/s does not include it)
    self.corpus, self.experts, self.options = corpus, experts, options
    self._pools = _Pools(futures.ThreadPoolExecutor(options.decode_threads),
                         futures.ThreadPoolExecutor(1))

  def label(self, output_dir: str, name: str, part: corpus_lib.Slice,
            progress: report.ShardProgress) -> dict:
    """Writes shard `name` of `part` into `output_dir`; returns its report."""
    return label_shard(os.path.join(output_dir, name), part, self.corpus, self.experts,
                       self.options, self._pools, progress)

  def close(self) -> None:
    self._pools.decode.shutdown()
    self._pools.write.shutdown()

  def __enter__(self) -> "ShardLabeller":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def plan_shards(output_dir: str, corpus: corpus_lib.Corpus, entries: Mapping[str, dict],
                options: JobOptions, settings: Mapping | None = None,
                owned: Callable[[int], bool] = lambda i: True,
                log: Callable[[str], None] = print,
                name: str = "worker 0/1") -> tuple[dict, list[int]]:
  """The plan, and the indices of the owned shards still to do (partial files removed first)."""
  plan = load_or_write_plan(output_dir, corpus, entries, options.split, settings)
  names = shard_names(plan)
  mine = [i for i in range(len(names)) if owned(i)]
  removed = shards.remove_partial(output_dir, names=[names[i] for i in mine])
  if removed:
    log(f"{name}: removed partial files {removed}")
  todo = [i for i in mine if not shards.is_complete(os.path.join(output_dir, names[i]))]
  log(f"{name}: {len(todo)} of {len(mine)} shards to do ({len(names)} in the job)")
  return plan, todo


def plan_slices(plan: Mapping) -> list[corpus_lib.Slice]:
  return [corpus_lib.Slice.from_json(s) for s in plan["slices"]]


def run_worker(corpus: corpus_lib.Corpus, experts: Mapping[str, base.Expert], output_dir: str,
               options: JobOptions = JobOptions(), num_workers: int = 1, worker_index: int = 0,
               command: str = "", log: Callable[[str], None] = print,
               settings: Mapping | None = None) -> dict | None:
  """Labels this worker's incomplete shards; writes the manifest if every shard is then complete.

  Returns the manifest when this call wrote it, else None (other workers still running).
  `settings` (the config the experts were built from) is kept in the plan for `finished_job`.
  """
  if not 0 <= worker_index < num_workers:
    raise JobError(f"worker_index must be in [0, {num_workers}), found {worker_index}")
  name = f"worker {worker_index}/{num_workers}"
  with ShardLabeller(corpus, experts, options) as labeller:
    plan, todo = plan_shards(output_dir, corpus, manifest_entries(experts), options, settings,
                             lambda i: i % num_workers == worker_index, log, name)
    names, slices = shard_names(plan), plan_slices(plan)
    progress = report.ShardProgress(name, [slices[i].count for i in todo], log,
                                    options.progress_every_s)
    for i in todo:
      labeller.label(output_dir, names[i], slices[i], progress)
      progress.shard_done()
  return finalize(output_dir, plan, command, log)


def finalize(output_dir: str, plan: Mapping, command: str,
             log: Callable[[str], None] = print) -> dict | None:
  """Manifest + merged bad-input report, once every shard of the plan is complete."""
  names = shard_names(plan)
  incomplete = [n for n in names if not shards.is_complete(os.path.join(output_dir, n))]
  if incomplete:
    log(f"{len(incomplete)} shards still being written by other workers; the last worker to "
        "finish writes the manifest (or rerun any worker)")
    return None
  merged = report.merge(output_dir, names)
  extra = {"corpus": plan["corpus"], "plan": PLAN_NAME,
           "bad_inputs": {"path": report.REPORT_NAME, "count": merged["count"],
                          "by_reason": merged["by_reason"]},
           "counts": merged["counts"]}
  manifest = shards.write_manifest(output_dir, plan["experts"], names, command, extra=extra)
  log(f"manifest written: {manifest['num_records']} records in {len(names)} shards, "
      f"{merged['count']} bad inputs listed in {report.REPORT_NAME}")
  return manifest


def finished_job(output_dir: str, settings: Mapping) -> dict | None:
  """The manifest of `output_dir` when it is complete and was made from the same `settings`
  (expert and corpus config), so a rerun can stop before loading and hashing any expert; else None
  (the caller then builds the experts, and `load_or_write_plan` checks the full identity)."""
  plan_path = os.path.join(output_dir, PLAN_NAME)
  if not os.path.exists(os.path.join(output_dir, shards.MANIFEST_NAME)) or not os.path.exists(plan_path):
    return None
  with open(plan_path) as f:
    plan = json.load(f)
  if plan.get("settings") != json.loads(json.dumps(settings)):
    return None
  if not all(shards.is_complete(os.path.join(output_dir, name)) for name in shard_names(plan)):
    return None
  return shards.read_manifest(output_dir)


def verify_job(output_dir: str) -> list[str]:
  """`shards.verify` plus the job's own bookkeeping: plan vs manifest, reports vs shards."""
  problems = shards.verify(output_dir)
  manifest = shards.read_manifest(output_dir)
  plan_path = os.path.join(output_dir, PLAN_NAME)
  if not os.path.exists(plan_path):
    return problems + [f"{plan_path}: missing"]
  with open(plan_path) as f:
    names = shard_names(json.load(f))
  listed = [shard["path"] for shard in manifest["shards"]]
  if listed != names:
    problems.append(f"{output_dir}: manifest lists shards {listed[:3]}..., plan expects {names[:3]}...")
  problems += report.check(output_dir, manifest)
  return problems
