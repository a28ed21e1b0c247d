"""Continuing a finished run: raising total_steps moves the cosine schedule and says so (with the
flag that keeps it), pinning optim.schedule_steps keeps it, and a checkpoint at or past
total_steps is reported instead of silently doing nothing."""

import logging

import pytest

from clipzoo_jax import config_base, metrics, train

pytestmark = pytest.mark.slow


def _config(total_steps, **optim):
  config = config_base.demo_config([])
  config_base.make_local(config)
  config.data.toyworld.num_examples, config.data.toyworld.num_shards = 64, 2
  config.data.num_workers = 0  # decode threads in-process: these tests are about the schedule
  config.total_steps, config.log_every, config.checkpoint_every = total_steps, 1, 1000
  config.async_checkpointing = False
  config.optim.update(optim)
  return config


def test_continuing_a_run_warns_about_its_schedule_and_can_keep_it(tmp_path, caplog):
  workdir = str(tmp_path)
  caplog.set_level(logging.WARNING, logger=train.log.name)
  train.log.propagate = True
  train.train(_config(6), workdir)
  assert not [r for r in caplog.records if "schedule changed" in r.getMessage()]

  train.train(_config(10), workdir)  # stretches the cosine: the rate at step 6 jumps
  warnings = [r.getMessage() for r in caplog.records if "schedule changed" in r.getMessage()]
  assert len(warnings) == 1 and "--config.optim.schedule_steps=6" in warnings[0], warnings
  rows = {row["step"]: row for row in metrics.read_rows(workdir)}
  assert rows[7]["learning_rate"] > rows[6]["learning_rate"]

  caplog.clear()
  train.train(_config(14, schedule_steps=10), workdir)  # extends on the schedule it had
  assert not [r for r in caplog.records if "schedule changed" in r.getMessage()]
  rows = {row["step"]: row for row in metrics.read_rows(workdir)}
  assert [rows[s]["learning_rate"] for s in range(11, 15)] == [0.0] * 4  # end_lr_factor 0
  assert sorted(rows) == list(range(1, 15))


def test_a_checkpoint_at_or_past_total_steps_is_reported(tmp_path, caplog):
  workdir = str(tmp_path)
  caplog.set_level(logging.WARNING, logger=train.log.name)
  train.log.propagate = True
  train.train(_config(4), workdir)
  assert train.train(_config(4), workdir) == {}
  assert any("nothing to do" in r.getMessage() for r in caplog.records)
  with pytest.raises(ValueError, match=r"checkpoint is at step 4, past config.total_steps 3"):
    train.train(_config(3), workdir)
  assert [row["step"] for row in metrics.read_rows(workdir)] == [1, 2, 3, 4]


def test_the_training_tool_reports_a_config_error_in_one_line(tmp_path):
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  command = [sys.executable, os.path.join(root, "tools", "train.py"), "--config=configs/demo.py:evals=none",
             f"--workdir={tmp_path}", "--config.global_batch_size=7"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
  assert result.returncode == 1
  assert ("error: config.global_batch_size 7 is not divisible by the data-parallel size 8"
          in result.stderr)
  assert "Traceback" not in result.stderr + result.stdout
  debug = subprocess.run(command + ["--debug"], cwd=root, env=env, capture_output=True, text=True)
  assert debug.returncode == 1 and "Traceback" in debug.stderr
