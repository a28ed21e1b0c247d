"""Run metrics: `metrics.jsonl` (one JSON object per logged step), TensorBoard, and a progress
line with rate and ETA. Only process 0 writes."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np


def _scalar(value) -> float:
  return float(np.asarray(value))


class MetricsWriter:
  def __init__(self, workdir: str, total_steps: int, tensorboard: bool = True):
    self.is_writer = jax.process_index() == 0
    self.total_steps = total_steps
    self._jsonl = None
    self._tb = None
    if self.is_writer:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> dict:
    row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    if self.is_writer:
      self._jsonl.write(json.dumps(row) + "\n")
      self._jsonl.flush()
      if self._tb is not None:
        for name, value in row.items():
          if name != "step":
            self._tb.add_scalar(name, value, step)
        self._tb.flush()
    return row

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class Progress:
  """Examples/s and ETA over the interval since the last report."""

  def __init__(self, total_steps: int, start_step: int, batch_size: int):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self._last_step, self._last_time = start_step, time.perf_counter()

  def tick(self, step: int) -> tuple[float, float]:
    """(examples per second, seconds left) since the previous tick."""
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    seconds_per_step = (now - self._last_time) / steps
    self._last_step, self._last_time = step, now
    return self.batch_size / max(seconds_per_step, 1e-9), seconds_per_step * (self.total_steps - step)

  @staticmethod
  def line(step: int, total: int, row: dict, rate: float, eta: float) -> str:
    losses = " ".join(f"{k}={v:.4f}" for k, v in row.items() if k.startswith("loss"))
    return (f"step {step}/{total} {losses} lr={row.get('learning_rate', 0):.2e} "
            f"{rate:.1f} ex/s ETA {_format_seconds(eta)}")


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"
