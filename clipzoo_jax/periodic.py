"""One answer to "is it time?" for all periodic work of the loop: logging, checkpoints and
evaluators each hold an `Every` and ask it at every step's `Moment`.

"Every N steps" counts from step 0 of the run, not from a restart, so a resumed run logs, saves
and evaluates at the same steps as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Moment:
  """Where the loop stands after running `step`: the run's last step, the first step this process
  ran (1 on a fresh start, checkpoint + 1 on a resume), and whether a stop was requested."""
  step: int
  total_steps: int
  first_step: int = 1
  stopping: bool = False

  @property
  def is_last(self) -> bool:
    return self.step == self.total_steps


@dataclasses.dataclass(frozen=True)
class Every:
  """Due every `steps` steps (0: never by count), and optionally at the last step, at a stop
  request (preemption), and at the first step this process runs."""
  steps: int = 0
  at_last: bool = True
  at_stop: bool = True
  at_first: bool = False

  def __post_init__(self):
    if int(self.steps) < 0:
      raise ValueError(f"Every: steps must be >= 0 (0 = never by count), found {self.steps}")

  def due(self, moment: Moment) -> bool:
    return ((self.steps > 0 and moment.step % self.steps == 0)
            or (self.at_last and moment.is_last)
            or (self.at_stop and moment.stopping)
            or (self.at_first and moment.step == moment.first_step))

