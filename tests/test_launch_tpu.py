"""tools/launch_tpu.py: the command sequences it runs (seen through --dry_run, with a fake `gcloud`
on PATH that reports the TPU VM's state), resume after a preemption, a sweep, one-line errors for
bad inputs, and the start/stop scripts it sends to the workers, run here for real in bash."""

import os
import shlex
import subprocess
import sys
import time

import pytest

from clipzoo_jax import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "launch_tpu.py")
FAKE_GCLOUD = """#!/bin/sh
echo "$*" >> "$FAKE_GCLOUD_LOG"
case "$*" in
  *describe*)
    if [ "$FAKE_TPU_STATE" = NOT_FOUND ]; then
      echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource $5 was not found" >&2
      exit 1
    fi
    echo "$FAKE_TPU_STATE";;
esac
"""
BASE = ["--name=clip-b16", "--zone=us-central2-b", "--project=proj", "--accelerator_type=v4-32",
        "--config=configs/cliptex.py:variant=B/16", "--workdir=gs://bucket/b16", "--dry_run"]


def _launch(tmp_path, state, *args):
  """(printed commands, gcloud calls made) of a dry run, gcloud reporting `state`."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  log = tmp_path / "gcloud_calls.txt"
  log.write_text("")
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_TPU_STATE=state,
             FAKE_GCLOUD_LOG=str(log))
  result = subprocess.run([sys.executable, TOOL, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line) for line in result.stdout.splitlines()
              if line and not line.startswith("#")]
  return commands, log.read_text().splitlines()


def _verbs(commands):
  """'tpu-vm create', 'ssh', 'tar', ... : what each printed command does."""
  verbs = []
  for command in commands:
    if command[0] == "tar":
      verbs.append("tar")
    elif command[4] == "ssh":
      script = next(c for c in command if c.startswith("--command="))
      verbs.append("start" if "tools/train.py" in script else
                   "install" if "pip install" in script else "unpack")
    else:
      verbs.append(f"{command[3]} {command[4]}")
  return verbs


def test_run_creates_syncs_installs_and_starts_on_all_workers(tmp_path):
  commands, calls = _launch(tmp_path, "NOT_FOUND", "run", "--spot", *BASE,
                            "--", "--config.global_batch_size=8192")
  assert _verbs(commands) == ["tpu-vm create", "tar", "tpu-vm scp", "unpack", "install", "start"]
  create = commands[0]
  assert "--accelerator-type=v4-32" in create and "--version=tpu-ubuntu2204-base" in create
  assert "--spot" in create and "--zone=us-central2-b" in create and "--project=proj" in create
  assert all("--worker=all" in c for c in commands[2:])
  install = commands[4][-1]
  assert "pip install" in install and "-r requirements.txt -r requirements-tpu.txt" in install
  assert "pip install -q --no-deps -e ." in install
  start = commands[5][-1]
  assert ("nohup python3 tools/train.py --config=configs/cliptex.py:variant=B/16 "
          "--workdir=gs://bucket/b16 --config.global_batch_size=8192 >> logs/clip-b16.log") in start
  assert calls == ["compute tpus tpu-vm describe clip-b16 --zone=us-central2-b --project=proj "
                   "--format=value(state)"]  # dry run: only the read-only query ran


@pytest.mark.parametrize("state,expected", [
    ("PREEMPTED", ["tpu-vm delete", "tpu-vm create"]),
    ("READY", []),
])
def test_rerunning_run_resumes_after_preemption(tmp_path, state, expected):
  """Same command again: a preempted VM is deleted and created again, a ready one reused; the
  trainer starts with the same workdir, so it continues from its newest checkpoint."""
  commands, _ = _launch(tmp_path, state, "run", "--spot", *BASE)
  assert _verbs(commands) == expected + ["tar", "tpu-vm scp", "unpack", "install", "start"]
  assert "--workdir=gs://bucket/b16" in commands[-1][-1]


def test_queued_resource_create_and_delete(tmp_path):
  args = [a.replace("v4-32", "v5litepod-256") for a in BASE] + ["--queued", "--spot"]
  commands, calls = _launch(tmp_path, "SUSPENDED", "create", *args)
  assert _verbs(commands) == ["queued-resources delete", "queued-resources create"]
  assert commands[0][-2:] == ["--force", "--quiet"]
  assert {"--node-id=clip-b16", "--accelerator-type=v5litepod-256",
          "--runtime-version=v2-alpha-tpuv5-lite", "--spot"} <= set(commands[1])
  assert "queued-resources describe" in calls[0]


def test_sweep_launches_one_job_per_point_with_its_own_name_and_workdir(tmp_path):
  args = [a.replace("cliptex.py:variant=B/16", "demo.py") for a in BASE]
  commands, _ = _launch(tmp_path, "NOT_FOUND", "run", "--sweep", *args)
  starts = [c for c in commands if _verbs([c]) == ["start"]]
  creates = [c for c in commands if _verbs([c]) == ["tpu-vm create"]]
  assert [c[5] for c in creates] == ["clip-b16-clip-ft", "clip-b16-cliptex"]
  assert "--config=configs/demo.py:tasks=none --workdir=gs://bucket/b16/clip_ft" in starts[0][-1]
  assert ("--config=configs/demo.py:tasks=seg+depth+normals+det "
          "--workdir=gs://bucket/b16/cliptex") in starts[1][-1]


def test_status_logs_stop_delete(tmp_path):
  common = [a for a in BASE if not a.startswith(("--config", "--workdir"))]
  commands, _ = _launch(tmp_path, "READY", "logs", "--worker=3", "--lines=20", *common)
  assert "--worker=3" in commands[0] and commands[0][-1] == (
      "--command=tail -n 20 clipzoo_jax/logs/clip-b16.log")
  commands, _ = _launch(tmp_path, "READY", "stop", *common)
  assert "kill -TERM $(cat logs/clip-b16.pid)" in commands[0][-1]
  commands, _ = _launch(tmp_path, "READY", "delete", *common)
  assert _verbs(commands) == ["tpu-vm delete"]


@pytest.mark.parametrize("change,message", [
    (("--accelerator_type=v9-8",), "--accelerator_type 'v9-8': expected TYPE-CORES"),
    (("--zone=",), "--zone is required"),
    (("--config=configs/missing.py",), "config file configs/missing.py not found"),
    (("--name=Bad_Name",), "a TPU name is lowercase letters"),
])
def test_bad_inputs_are_one_line_errors(change, message):
  replaced = {c.split("=")[0] for c in change}
  args = [a for a in BASE if a.split("=")[0] not in replaced] + list(change)
  result = subprocess.run([sys.executable, TOOL, "run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
  assert result.returncode == 1
  assert result.stderr.startswith("error: ") and message in result.stderr.splitlines()[0]


def test_start_and_stop_scripts_run_in_bash(tmp_path):
  """The scripts the workers get: the trainer detached with its pid recorded, no second trainer
  beside a running one, SIGTERM to exactly that process."""
  repo = tmp_path / "repo"
  (repo / "tools").mkdir(parents=True)
  (repo / "tools" / "train.py").write_text(
      "import signal, sys, time\n"
      "signal.signal(signal.SIGTERM, lambda *_: (print('saved, exiting', flush=True), "
      "sys.exit(0)))\nprint('training', sys.argv[1:], flush=True)\ntime.sleep(60)\n")
  job = launch.Job(name="t", zone="z", project=None, accelerator_type="v4-8",
                   runtime_version="r", config="configs/demo.py", workdir="w",
                   repo_dir=str(repo))
  script = lambda command: command[-1].removeprefix("--command=")
  env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
  bash = lambda text: subprocess.run(["bash", "-c", text], cwd=tmp_path, env=env,
                                     capture_output=True, text=True, timeout=30, check=False)
  assert bash(script(launch.start_command(job))).returncode == 0
  log, pid_file = repo / job.log, repo / job.pid_file
  for _ in range(100):
    if "training" in (log.read_text() if log.exists() else ""):
      break
    time.sleep(0.1)
  pid = int(pid_file.read_text())
  assert "tools/train.py" in open(f"/proc/{pid}/cmdline").read()
  second = bash(script(launch.start_command(job)))
  assert second.returncode == 1 and "already training" in second.stdout
  assert bash(script(launch.stop_command(job))).returncode == 0
  for _ in range(100):
    if "saved, exiting" in log.read_text():
      break
    time.sleep(0.1)
  assert "saved, exiting" in log.read_text()
