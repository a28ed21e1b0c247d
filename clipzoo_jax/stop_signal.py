"""The preemption notice (SIGTERM) as a flag, installed before anything slow happens.

Tools call `install()` first thing, before importing JAX or reading data, so a SIGTERM that
arrives while a run is still starting asks it to stop at its first step (after saving) instead of
killing it. This module imports nothing heavy on purpose.
"""

from __future__ import annotations

import signal

_requested = False


def _handler(signum, frame) -> None:
  del signum, frame
  global _requested
  _requested = True


def install() -> None:
  """Routes SIGTERM to the flag (a no-op outside the main thread, e.g. under some runners)."""
  try:
    signal.signal(signal.SIGTERM, _handler)
  except ValueError:
    pass


def requested() -> bool:
  return _requested


def reset() -> None:
  """Clears the flag (tests that run several trainings in one process)."""
  global _requested
  _requested = False
