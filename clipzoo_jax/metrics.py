"""Run metrics: `metrics.jsonl` with exactly one JSON row per step, and TensorBoard beside it.

Everything logged at one step (training interval means, evaluator results, data counters) is
merged into that step's row. A resumed run opens the writer at its checkpoint step: rows after it
are dropped (those steps will run again), so a step redone after a crash replaces its row instead
of repeating it. TensorBoard is rebuilt from the file whenever the file is rewritten, so the file,
TensorBoard, the plots and any reader (`read_rows`) always agree. Only process 0 writes.

A workdir in a bucket (`storage`, e.g. gs://) has no append: each flush uploads the whole
`metrics.jsonl` again (one object write per logged step, so readers see the old file or the new
one), and TensorBoard's event file is written locally and uploaded after each flush.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Mapping

import jax
import numpy as np

from clipzoo_jax import storage

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _scalar(value) -> float:
  return float(np.asarray(value))


def read_rows(workdir: str) -> list[dict]:
  """The rows of `<workdir>/metrics.jsonl`, one per step in step order. Rows of the same step
  (files written before rows were merged) are merged, later values winning."""
  path = storage.join(workdir, METRICS_FILE)
  rows: dict[int, dict] = {}
  if not storage.exists(path):
    return []
  with storage.open_file(path, "r") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        step = int(row["step"])
      except (ValueError, KeyError, TypeError) as error:
        if not line.endswith("\n"):
          break  # the torn last line of a write cut short by a kill; its step will run again
        raise ValueError(f"{path}: line {number} is not a metrics row ({error}): "
                         f"{line[:200]!r}") from None
      rows.setdefault(step, {}).update(row)
  return [rows[step] for step in sorted(rows)]


def _jsonl(rows) -> str:
  return "".join(json.dumps(row) + "\n" for row in rows)


class MetricsWriter:
  """Collects each step's metrics into one row; `flush` writes the collected rows.

  `resume_step`: the step the run restarts from (its checkpoint); rows after it are dropped.
  Appending a later step is the common, cheap case; adding to an earlier step's row (an
  evaluator run standalone on an old checkpoint) rewrites the file atomically.
  """

  def __init__(self, workdir: str, resume_step: int | None = None, tensorboard: bool = True):
    self.is_writer = jax.process_index() == 0
    self.workdir = workdir
    self.path = storage.join(workdir, METRICS_FILE)
    self.tensorboard_dir = storage.join(workdir, TENSORBOARD_DIR) if tensorboard else None
    self._pending: dict[int, dict] = {}
    self._last_step: int | None = None
    self._text: str | None = None  # the file's content, kept where it cannot be appended to
    self._tb = None
    self._tb_staging: str | None = None  # the local event files of a TensorBoard in a bucket
    if self.is_writer:
      storage.makedirs(workdir)
      rows = read_rows(workdir)
      if resume_step is not None:
        rows = [row for row in rows if row["step"] <= resume_step]
      self._rewrite(rows)

  def write(self, step: int, metrics: Mapping) -> dict:
    """Merges `metrics` into step's pending row; returns that row (as floats, with `step`)."""
    row = self._pending.setdefault(int(step), {"step": int(step)})
    row.update({name: _scalar(value) for name, value in metrics.items()})
    return dict(row)

  def flush(self) -> None:
    """Writes the pending rows: appended when they follow the file's last step, else merged."""
    pending, self._pending = self._pending, {}
    if not self.is_writer or not pending:
      return
    if self._last_step is not None and min(pending) <= self._last_step:
      merged = {row["step"]: row for row in read_rows(self.workdir)}
      for step, row in pending.items():
        merged.setdefault(step, {}).update(row)
      self._rewrite([merged[step] for step in sorted(merged)])
      return
    rows = [pending[step] for step in sorted(pending)]
    if self._text is None:
      with open(self.path, "a") as f:
        f.write(_jsonl(rows))
    else:  # an object store: the whole file again
      self._text += _jsonl(rows)
      storage.write_text(self.path, self._text)
    self._add_to_tensorboard(rows)
    self._last_step = rows[-1]["step"]

  def close(self) -> None:
    self.flush()
    self._close_tensorboard()

  def _rewrite(self, rows: list[dict]) -> None:
    """The file and TensorBoard become exactly `rows`."""
    text = _jsonl(rows)
    storage.write_text(self.path, text)
    self._text = text if storage.is_url(self.path) else None
    self._last_step = rows[-1]["step"] if rows else None
    if self.tensorboard_dir is None:
      return
    self._close_tensorboard()
    for events in storage.glob(storage.join(self.tensorboard_dir, "events.out.tfevents.*")):
      storage.remove(events)
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    if storage.is_url(self.tensorboard_dir):
      self._tb_staging = tempfile.mkdtemp(prefix="tensorboard-")
    self._tb = SummaryWriter(self._tb_staging or self.tensorboard_dir)
    self._add_to_tensorboard(rows)

  def _add_to_tensorboard(self, rows: list[dict]) -> None:
    if self._tb is None:
      return
    for row in rows:
      for name, value in row.items():
        if name != "step":
          self._tb.add_scalar(name, value, row["step"])
    self._tb.flush()
    self._upload_tensorboard()

  def _upload_tensorboard(self) -> None:
    """A TensorBoard in a bucket: its local event file, uploaded whole."""
    if self._tb_staging is None:
      return
    for name in os.listdir(self._tb_staging):
      with open(os.path.join(self._tb_staging, name), "rb") as f:
        storage.write_bytes(storage.join(self.tensorboard_dir, name), f.read())

  def _close_tensorboard(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._upload_tensorboard()
      self._tb = None
    if self._tb_staging is not None:
      shutil.rmtree(self._tb_staging, ignore_errors=True)
      self._tb_staging = None
