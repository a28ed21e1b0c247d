"""The training tool end to end, as a user runs it: loss falls, checkpoints resume, a preempted
run finishes with the same losses as an uninterrupted one, and the device count does not change
the numbers."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs about stopping and resuming (signals, kills, buckets, two hosts): the demo at toy size with
# one head, which compiles in about 10 s instead of 18 with all four. The demo run below keeps
# all four heads and checks each of their losses.
RESUME_CONFIG = "configs/demo.py:runlocal,evals=none,tasks=seg"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  """Runs of the same config compile the same programs: share XLA's persistent cache. They also
  share their inputs: the first run writes the toy-world shards and trains the tokenizer in one
  directory, and every later run of the module finds them complete there (as a user's second
  run with the same --config.data.directory does) instead of spending seconds on each."""
  os.environ["CLIPZOO_TEST_JAX_CACHE"] = str(tmp_path_factory.mktemp("jax_cache"))
  os.environ["CLIPZOO_TEST_INPUTS"] = str(tmp_path_factory.mktemp("inputs"))
  yield
  os.environ.pop("CLIPZOO_TEST_JAX_CACHE", None)
  os.environ.pop("CLIPZOO_TEST_INPUTS", None)


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  if "CLIPZOO_TEST_JAX_CACHE" in env:
    env["JAX_COMPILATION_CACHE_DIR"] = env["CLIPZOO_TEST_JAX_CACHE"]
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return env


def _command(workdir, *flags, config="configs/demo.py:evals=none"):
  inputs = os.environ.get("CLIPZOO_TEST_INPUTS")
  shared = [f"--config.data.directory={inputs}/toyworld",
            f"--config.tokenizer.directory={inputs}/tokenizer"] if inputs else []
  return [sys.executable, os.path.join(ROOT, "tools", "train.py"), f"--config={config}",
          f"--workdir={workdir}", "--config.data.toyworld.num_examples=512",
          "--config.data.toyworld.num_shards=4", *shared, *flags]


def _train(workdir, *flags, devices=8, config="configs/demo.py:evals=none"):
  result = subprocess.run(_command(workdir, *flags, config=config), env=_env(devices), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _checkpoint_steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def test_demo_loss_falls_and_resumes_on_another_device_count(tmp_path):
  workdir = str(tmp_path / "demo")
  narrow = "--config.model.heads.hidden=16"  # the demo's 64-wide heads are most of its time
  out = _train(workdir, "--config.total_steps=24", "--config.checkpoint_every=12", narrow,
               devices=8)
  assert "ex/s ETA" in out
  assert os.path.getsize(os.path.join(workdir, "loss.png")) > 1000
  rows = _rows(workdir)
  assert rows[0]["step"] == 1 and rows[-1]["step"] == 24
  for key in ("loss", "loss/contrastive", "loss/seg", "loss/depth", "loss/normals", "loss/det",
              "learning_rate", "examples_per_sec"):
    assert key in rows[-1], key
  assert rows[-1]["loss"] < 0.9 * rows[0]["loss"]
  assert _checkpoint_steps(workdir) == [12, 24]

  # resumed on 1 device from the 8-device (data=4, fsdp=2) checkpoint: the data position and the
  # state carry over (tests/test_fault_tolerance.py checks the losses equal across 8, 4 and 1)
  out = _train(workdir, "--config.total_steps=30", "--config.checkpoint_every=6", narrow,
               devices=1)
  assert "step 30/30" in out
  new_rows = _rows(workdir)[len(rows):]
  assert new_rows[0]["step"] == 25 and new_rows[-1]["step"] == 30
  assert _checkpoint_steps(workdir)[-1] == 30
  assert new_rows[-1]["loss"] < 0.9 * rows[0]["loss"]


def test_preempted_run_resumes_to_the_same_losses(tmp_path):
  """SIGTERM to the whole process group (as a VM shutdown sends it: the loader's worker
  processes get it too) saves and stops; the rerun continues with the same losses."""
  flags = ["--config.total_steps=20", "--config.log_every=1", "--config.checkpoint_every=1000"]
  config = RESUME_CONFIG
  straight = str(tmp_path / "straight")
  _train(straight, *flags, config=config)

  preempted = str(tmp_path / "preempted")
  process = subprocess.Popen(_command(preempted, *flags, config=config), env=_env(8), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
  metrics = os.path.join(preempted, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
      break
    time.sleep(0.05)
  os.killpg(process.pid, signal.SIGTERM)
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 0, output[-3000:]
  stopped = _checkpoint_steps(preempted)[-1]
  assert 3 <= stopped < 20, f"SIGTERM should stop the run early; it saved step {stopped}"
  _train(preempted, *flags, config=config)

  expected = {row["step"]: row["loss"] for row in _rows(straight)}
  resumed = {row["step"]: row["loss"] for row in _rows(preempted)}
  assert sorted(resumed) == sorted(expected)  # no step lost, none repeated
  for step in range(stopped + 1, 21):
    assert resumed[step] == pytest.approx(expected[step], rel=1e-5), step


def test_run_killed_between_checkpoints_keeps_one_row_per_step(tmp_path):
  """SIGKILL after the step-15 checkpoint but before the end: the rerun redoes steps 16.., and
  metrics.jsonl, TensorBoard and the loss plot's data all hold each step exactly once."""
  from clipzoo_jax import plots
  from tests import helpers
  flags = ["--config.total_steps=50", "--config.log_every=1", "--config.checkpoint_every=15"]
  config = RESUME_CONFIG
  workdir = str(tmp_path / "killed")
  process = subprocess.Popen(_command(workdir, *flags, config=config), env=_env(8), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if (os.path.isdir(os.path.join(workdir, "checkpoints", "15"))
        and len(open(metrics).readlines()) >= 20):
      break
    time.sleep(0.01)
  workers = _children(process.pid)
  assert workers, "the loader's worker processes should be running"
  process.kill()
  process.wait(timeout=60)
  deadline = time.time() + 20
  while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in workers):
    time.sleep(0.1)
  assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")], "orphaned workers"
  logged = [row["step"] for row in _rows(workdir)]
  assert 15 in _checkpoint_steps(workdir) and max(logged) < 50, (logged[-1], process.returncode)
  assert max(logged) > 15  # rows past the checkpoint exist and will be redone

  _train(workdir, *flags, config=config)
  rows = _rows(workdir)
  assert [row["step"] for row in rows] == list(range(1, 51))
  helpers.assert_tensorboard_matches_file(workdir)
  steps, values = plots.loss_series(workdir)["loss"]
  assert steps == list(range(1, 51)) and values == [row["loss"] for row in rows]
  assert os.path.getsize(os.path.join(workdir, "loss.png")) > 1000


def _children(pid: int) -> list[int]:
  """Live child processes of `pid` (Linux /proc), e.g. the loader's workers."""
  found = []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
      continue
    if entry.isdigit() and int(fields[1]) == pid and fields[0] != "Z":
      found.append(int(entry))
  return found
