"""Bookkeeping of the pseudo-labelling job: bad inputs per shard and merged, and progress lines.

Every pair read is either written or listed here with its key and reason, so nothing vanishes
silently: per shard in `<shard>.report.json`, merged in `bad_inputs.json` by the last worker.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import time
from typing import Callable, Mapping, Sequence

from clipzoo_jax import atomic_files, progress

REPORT_NAME = "bad_inputs.json"
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def describe(error: BaseException) -> str:
  """'Type: message' without memory addresses ('<_io.BytesIO object at 0x7f...>'), so identical
  runs write identical reports."""
  message = _ADDRESS.sub("", str(error)).strip()
  return f"{type(error).__name__}: {message}" if message else type(error).__name__


@dataclasses.dataclass
class BadInput:
  key: str
  reason: str

  @property
  def category(self) -> str:
    """The reason without its details (the text before the first colon), e.g. 'undecodable
    image'; reasons put keys, paths and sizes after that colon."""
    return self.reason.split(":", 1)[0]


@dataclasses.dataclass
class ShardReport:
  shard: str
  slice: dict
  read: int = 0
  written: int = 0
  bad: list[BadInput] = dataclasses.field(default_factory=list)
  seconds: dict[str, float] = dataclasses.field(
      default_factory=lambda: {"total": 0.0, "experts": 0.0, "wait_input": 0.0, "wait_write": 0.0})

  def to_json(self) -> dict:
    return dict(dataclasses.asdict(self), bad=[dataclasses.asdict(b) for b in self.bad])


def shard_report_path(shard_path: str) -> str:
  return shard_path + ".report.json"


def _read_reports(directory: str, names: Sequence[str]) -> list[dict]:
  reports = []
  for name in names:
    with open(shard_report_path(os.path.join(directory, name))) as f:
      reports.append(json.load(f))
  return reports


def merge(directory: str, names: Sequence[str]) -> dict:
  """Writes `bad_inputs.json` from the shards' reports and returns it (without writing twice)."""
  reports = _read_reports(directory, names)
  items = [dict(bad, shard=r["shard"]) for r in reports for bad in r["bad"]]
  by_reason = collections.Counter(BadInput(i["key"], i["reason"]).category for i in items)
  merged = {
      "count": len(items),
      "by_reason": dict(sorted(by_reason.items())),
      "counts": {"read": sum(r["read"] for r in reports),
                 "written": sum(r["written"] for r in reports), "bad": len(items)},
      "items": items,
  }
  atomic_files.write_json(os.path.join(directory, REPORT_NAME), merged, indent=1)
  return merged


def check(directory: str, manifest: Mapping) -> list[str]:
  """Reports agree with the shards: written = records in the shard, read = written + bad."""
  problems = []
  shards = manifest["shards"]
  for shard in shards:
    path = shard_report_path(os.path.join(directory, shard["path"]))
    if not os.path.exists(path):
      problems.append(f"{path}: missing")
      continue
    with open(path) as f:
      shard_report = json.load(f)
    if shard_report["written"] != shard["num_records"]:
      problems.append(f"{path}: written {shard_report['written']}, shard has {shard['num_records']}")
    if shard_report["read"] != shard_report["written"] + len(shard_report["bad"]):
      problems.append(f"{path}: read {shard_report['read']} != written {shard_report['written']} "
                      f"+ bad {len(shard_report['bad'])}")
  merged_path = os.path.join(directory, REPORT_NAME)
  if not os.path.exists(merged_path):
    problems.append(f"{merged_path}: missing")
  return problems


class ShardProgress:
  """Per-worker progress: images/s and ETA, printed at most every `every_s` and per shard.

  The ETA counts images of the remaining shards: known slice sizes where the corpus knows them,
  else the mean size of the shards finished so far.
  """

  def __init__(self, name: str, shard_sizes: Sequence[int | None], log: Callable[[str], None],
               every_s: float = 10.0):
    self.name, self.log, self.every_s = name, log, every_s
    self.sizes = list(shard_sizes)
    self.shards_done = 0
    self.images = self.bad = 0
    self.images_at_shard_start = 0
    self.done_sizes: list[int] = []
    self.start = self.last = time.perf_counter()

  def add(self, images: int, bad: int) -> None:
    self.images += images
    self.bad += bad
    if time.perf_counter() - self.last >= self.every_s:
      self.print()

  def shard_done(self) -> None:
    self.done_sizes.append(self.images - self.images_at_shard_start)
    self.images_at_shard_start = self.images
    self.shards_done += 1
    self.print()

  def rate(self) -> float:
    return progress.throughput(self.images, time.perf_counter() - self.start)

  def eta_seconds(self) -> float | None:
    remaining_sizes = self.sizes[self.shards_done:]
    if not remaining_sizes:
      return 0.0
    mean = sum(self.done_sizes) / len(self.done_sizes) if self.done_sizes else None
    if any(s is None for s in remaining_sizes) and mean is None:
      return None
    remaining = sum(mean if s is None else s for s in remaining_sizes)
    remaining -= self.images - self.images_at_shard_start
    return progress.seconds_left(remaining, self.rate())

  def line(self) -> str:
    eta = progress.format_eta(self.eta_seconds())
    return (f"{self.name}: shard {self.shards_done}/{len(self.sizes)} | {self.images} images "
            f"({self.bad} bad) | {self.rate():.1f} img/s | ETA {eta}")

  def print(self) -> None:
    self.last = time.perf_counter()
    self.log(self.line())
