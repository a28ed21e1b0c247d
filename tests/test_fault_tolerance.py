"""Faults a pod job meets, injected for real: divergence, damaged and silently corrupted
checkpoints, an unwritable checkpoint folder, an error mid-loop, a topology change, and bad
configs. None may cost more than the steps since the last save or leave a bad checkpoint."""

import glob
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from clipzoo_jax import checkpoint, cli, config_base, metrics, run, stop_signal, train
from clipzoo_jax.data import grain_loader
from tests import helpers


def _config(total_steps=8, checkpoint_every=2, log_every=1, **changes):
  config = config_base.demo_config([])
  config_base.make_local(config)
  config.data.toyworld.num_examples, config.data.toyworld.num_shards = 64, 2
  config.data.num_workers = 0  # decode threads in-process: these tests are about the loop
  config.total_steps, config.checkpoint_every, config.log_every = (total_steps, checkpoint_every,
                                                                    log_every)
  config.keep_checkpoints = 3
  config.async_checkpointing = False
  config.optim.schedule_steps = 8  # one schedule, however far a leg of a test runs
  for key, value in changes.items():
    config[key] = value
  return config


def _losses(workdir):
  return {row["step"]: row["loss"] for row in metrics.read_rows(workdir)}


def _all_finite_checkpoints(workdir, config):
  built = run.setup(config)
  reader = checkpoint.Checkpointer(workdir)
  steps = sorted(reader.manager.all_steps())
  for step in steps:
    state, _ = reader.restore(step, built.abstract_state)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state)), step
  reader.close()
  return steps


@pytest.fixture(autouse=True)
def _fresh_stop_flag():
  stop_signal.reset()
  yield
  stop_signal.reset()


@pytest.mark.slow
def test_divergence_never_reaches_a_checkpoint_with_either_policy(tmp_path):
  """The issue's case: lr 1e9, checkpoints every 2 steps, rows every 5 (not a multiple)."""
  stop = str(tmp_path / "stop")
  config = _config(total_steps=20, checkpoint_every=2, log_every=5)
  config.optim.learning_rate = 1e9
  with pytest.raises(train.NonFiniteError, match=r"step (\d+): non-finite .*loss") as caught:
    train.train(config, stop)
  failed = int(caught.value.args[0].split()[1].rstrip(":"))
  steps = _all_finite_checkpoints(stop, config)
  assert steps and max(steps) < failed

  skip = str(tmp_path / "skip")
  config.nonfinite = "skip"
  train.train(config, skip)
  rows = metrics.read_rows(skip)
  assert [r["step"] for r in rows] == [1, 5, 10, 15, 20]
  skipped = sum(r["train/skipped_nonfinite"] for r in rows)
  assert skipped > 0
  assert 20 in _all_finite_checkpoints(skip, config)


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
  """An uninterrupted 8-step run, and a run stopped after its step-6 checkpoint (2, 4, 6)."""
  root = tmp_path_factory.mktemp("runs")
  straight, stopped = str(root / "straight"), str(root / "stopped")
  train.train(_config(total_steps=8), straight)
  train.train(_config(total_steps=6), stopped)
  return straight, stopped


def _damage(step_dir, damage):
  if damage == "missing_data_item":
    shutil.rmtree(os.path.join(step_dir, "data"))
  elif damage == "missing_state_metadata":
    os.remove(os.path.join(step_dir, "state", "_METADATA"))
  elif damage == "zeroed_json":
    path = glob.glob(os.path.join(step_dir, "data", "*"))[0]
    with open(path, "r+b") as f:
      f.write(b"\0" * os.path.getsize(path))
  else:  # one flipped bit in the largest array data file: no error, different numbers
    files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
             if os.path.isfile(p)]
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
      data = bytearray(f.read())
      data[len(data) // 2] ^= 0x10
      f.seek(0)
      f.write(data)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["missing_data_item", "missing_state_metadata", "zeroed_json",
                                    "flipped_byte"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, trained_runs,
                                                                     damage, caplog):
  straight, stopped = trained_runs
  workdir = str(tmp_path / "damaged")
  shutil.copytree(stopped, workdir)
  _damage(os.path.join(workdir, "checkpoints", "6"), damage)
  caplog.set_level(logging.WARNING)
  train.train(_config(total_steps=8), workdir)
  assert any("checkpoint 6 does not restore" in r.getMessage() for r in caplog.records)
  assert os.listdir(os.path.join(workdir, "checkpoints_damaged"))[0].startswith("6-")
  resumed, expected = _losses(workdir), _losses(straight)
  assert sorted(resumed) == list(range(1, 9))
  for step in (5, 6, 7, 8):  # redone from step 4, equal to the uninterrupted run
    assert resumed[step] == pytest.approx(expected[step], rel=1e-6), step


def test_no_restorable_checkpoint_is_an_error_naming_each_step(tmp_path):
  config = helpers.tiny_config()
  built = helpers.run_on(config, [2, 2, 2])
  writer = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  writer.save(3, built.init_state(), {})
  writer.close()
  other = helpers.tiny_config(tasks=("seg",))  # a config the checkpoint does not fit
  with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint restores: step 3: "):
    helpers.run_on(other, [2, 2, 2]).restore_or_init(checkpoint.Checkpointer(str(tmp_path)))


def test_an_unwritable_checkpoint_folder_fails_at_once(tmp_path):
  with open(tmp_path / "checkpoints", "w") as f:
    f.write("a file where the folder should be")
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints cannot be written there"):
    checkpoint.Checkpointer(str(tmp_path))


@pytest.mark.slow
def test_an_error_mid_loop_finishes_the_save_and_is_the_error_raised(tmp_path, monkeypatch):
  original = grain_loader.GrainPipeline.__next__

  def failing_next(self):
    if self._batches == 5:
      raise RuntimeError("disk gone while reading batch 6")
    return original(self)

  monkeypatch.setattr(grain_loader.GrainPipeline, "__next__", failing_next)
  config = _config(total_steps=8, checkpoint_every=4)
  config.async_checkpointing = True
  with pytest.raises(RuntimeError, match="disk gone while reading batch 6"):
    train.train(config, str(tmp_path))
  reader = checkpoint.Checkpointer(str(tmp_path))
  assert reader.latest_step() == 4  # the async save in flight when the error came is complete
  assert reader.restore_latest(run.setup(config).abstract_state)[2] == 4


@pytest.mark.slow
def test_a_checkpoint_moves_between_8_4_and_1_devices(tmp_path, trained_runs):
  """Saved on 8 devices, resumed on 4, then on 1: data position kept, losses as on 8."""
  straight, stopped = trained_runs
  workdir = str(tmp_path / "moved")
  shutil.copytree(stopped, workdir)
  train.train(_config(total_steps=7), workdir, devices=jax.devices()[:4])
  train.train(_config(total_steps=8), workdir, devices=jax.devices()[:1])
  expected, found = _losses(straight), _losses(workdir)
  assert sorted(found) == list(range(1, 9))
  for step in (7, 8):
    assert found[step] == pytest.approx(expected[step], rel=1e-5), step


@pytest.mark.parametrize("change,message", [
    (dict(global_batch_size=20, mesh=[-1, 1, 1]),
     r"config.global_batch_size 20 is not divisible by the data-parallel size 8"),
    (dict(mesh=[3, 1, 1], mesh_allow_shrink=False),
     r"config.mesh \(3, 1, 1\) has 3 devices; 8 are available"),
    (dict(nonfinite="ignore"), r"config.nonfinite: expected one of \['stop', 'skip'\]"),
    (dict(model_init="/no/such/clip"), r"config.model_init /no/such/clip: no such file"),
])
def test_bad_configs_fail_before_anything_compiles(change, message):
  config = helpers.tiny_config()
  for key, value in change.items():
    config[key] = value
  with pytest.raises(cli.UserError, match=message):
    run.setup(config)


def test_loss_config_errors_come_before_tracing():
  config = helpers.tiny_config()
  config.loss.depth = "l1"
  with pytest.raises(cli.UserError, match=r"config.loss.depth: expected one of \['ssi', 'silog'\]"):
    run.setup(config)
  config = helpers.tiny_config()
  del config.loss.weights["det"]
  with pytest.raises(cli.UserError, match=r"config.loss.weights: no weight for the tasks \['det'\]"):
    run.setup(config)
  config = helpers.tiny_config()
  config.global_batch_size = 4  # fine for 2-way data parallelism with 4-way tensor parallelism
  assert helpers.run_on(config, [1, 2, 4]).abstract_batch["image"].shape[0] == 4
  config.global_batch_size = 3
  with pytest.raises(cli.UserError, match=r"config.global_batch_size 3 is not divisible by the "
                                          r"data-parallel size 2 \(mesh data x fsdp"):
    helpers.run_on(config, [1, 2, 4])
