"""Expands a config's `sweep(add, arg)` into named points (one workdir each). Used by
tools/sweep.py to run points locally in sequence, and by tools/launch_tpu.py --sweep (one TPU job
per point)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

from clipzoo_jax import cli


@dataclasses.dataclass
class SweepPoint:
  name: str        # also the workdir's sub-directory name
  config: str      # "configs/file.py:args" to pass as --config
  overrides: dict  # extra --config.key=value flags

  def flags(self) -> list[str]:
    return [f"--config={self.config}"] + [f"--config.{k}={v}" for k, v in self.overrides.items()]


def load_config_module(path: str):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _safe_name(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.=+-]", "_", name)


def expand(config_spec: str) -> list[SweepPoint]:
  """'configs/demo.py[:arg]' -> the points its sweep(add, arg) adds.

  `add(name=..., arg=..., **overrides)`: `arg` replaces the config's arg string, overrides become
  `--config.key=value`.
  """
  path, _, arg = config_spec.partition(":")
  module = load_config_module(path)
  if not hasattr(module, "sweep"):
    raise cli.UserError(f"{path}: defines no sweep(add, arg) function to expand")
  points: list[SweepPoint] = []

  def add(name: str | None = None, arg: str | None = None, **overrides):
    point_arg = arg if arg is not None else spec_arg
    label = name or ",".join(f"{k}={v}" for k, v in overrides.items()) or point_arg or "default"
    config = f"{path}:{point_arg}" if point_arg else path
    points.append(SweepPoint(_safe_name(label), config, overrides))

  spec_arg = arg
  module.sweep(add, arg or None)
  names = [p.name for p in points]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise cli.UserError(f"{path}: sweep adds points with the same name {duplicates}; names are "
                     "workdir names and must be unique")
  return points
