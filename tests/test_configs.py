"""Configs and their args, and sweep expansion into named points."""

import pytest

from clipzoo_jax import config_args, sweep


def test_parse_arg_types_and_unknown_names():
  args = config_args.parse_arg("variant=L/14,runlocal,lr=0.5,batch_size=8", variant="B/16",
                               runlocal=False, lr=1.0, batch_size=1)
  assert (args.variant, args.runlocal, args.lr, args.batch_size) == ("L/14", True, 0.5, 8)
  with pytest.raises(ValueError, match="known args"):
    config_args.parse_arg("nope=1", variant="B/16")
  assert config_args.parse_tasks("none") == []
  assert config_args.parse_tasks("seg+depth") == ["seg", "depth"]


def test_cliptex_config_variants_tasks_and_clip_ft_baseline():
  from configs import cliptex
  config = cliptex.get_config("variant=L/14,tasks=seg+det")
  assert config.model.image.width == 1024 and config.model.image.patch_size == 14
  assert list(config.model.heads.tasks) == ["seg", "det"]
  assert dict(config.loss.weights) == {"seg": 1.0, "det": 1.0}
  assert config.data.label_size == 224 // 14 * config.model.heads.upsample
  baseline = cliptex.get_config("tasks=none")
  assert list(baseline.model.heads.tasks) == [] and dict(baseline.loss.weights) == {}
  local = cliptex.get_config("runlocal")
  assert local.total_steps <= 10 and local.data.toyworld.num_examples <= 256


def test_sweep_expands_into_unique_named_points():
  points = sweep.expand("configs/cliptex.py:variant=B/32")
  names = [p.name for p in points]
  assert "tasks=none" in names and len(names) == len(set(names))
  assert points[0].config.startswith("configs/cliptex.py:tasks=")
  demo = sweep.expand("configs/demo.py")
  assert [p.name for p in demo] == ["clip_ft", "cliptex"]
  assert demo[0].flags() == ["--config=configs/demo.py:tasks=none"]


def test_sweep_tool_dry_run_prints_one_train_command_per_point(tmp_path):
  import subprocess
  import sys
  result = subprocess.run(
      [sys.executable, "tools/sweep.py", "--config", "configs/demo.py", "--workdir",
       str(tmp_path), "--dry_run", "--", "--config.total_steps=5"],
      capture_output=True, text=True, check=True)
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 2
  assert "--config=configs/demo.py:tasks=none" in lines[0]
  assert f"--workdir={tmp_path}/clip_ft" in lines[0] and "--config.total_steps=5" in lines[0]
  assert f"--workdir={tmp_path}/cliptex" in lines[1]
  assert not any(tmp_path.iterdir())  # a dry run creates nothing
