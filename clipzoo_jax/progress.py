"""Progress lines of long jobs: throughput, seconds left, and one way to write a duration.

Training (`Progress`, per logged step) and the pseudo-labelling job (`pseudo_label.report`, per
shard) both print a rate and an ETA; they share these helpers so an ETA reads the same everywhere.
"""

from __future__ import annotations

import time


def format_duration(seconds: float) -> str:
  """`H:MM:SS`, rounded to whole seconds; a negative duration is 0:00:00. E.g. 20.4 -> '0:00:20'."""
  seconds = max(int(round(seconds)), 0)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_eta(seconds: float | None) -> str:
  """`format_duration`, or '?' while the time left is unknown."""
  return "?" if seconds is None else format_duration(seconds)


def throughput(count: float, seconds: float) -> float:
  """Items per second; an interval of 0 s counts as 1 ns, so the first line never divides by 0."""
  return count / max(seconds, 1e-9)


def seconds_left(remaining: float, rate: float) -> float | None:
  """Time to do `remaining` items at `rate` items/s (none left: 0); None while the rate is 0."""
  return max(remaining, 0) / rate if rate > 0 else None


class Progress:
  """Training: examples/s and ETA over the interval since the last report."""

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
    return throughput(self.batch_size, seconds_per_step), seconds_per_step * (self.total_steps - step)

  @staticmethod
  def line(step: int, total: int, row: dict, rate: float, eta: float) -> str:
    losses = " ".join(f"{k}={v:.4f}" for k, v in row.items() if k.startswith("loss"))
    return (f"step {step}/{total} {losses} lr={row.get('learning_rate', 0):.2e} "
            f"{rate:.1f} ex/s ETA {format_duration(eta)}")
