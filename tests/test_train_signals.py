"""Training stopped by signals, end to end: two processes stop together on one SIGTERM and resume
in one process, and a SIGTERM while the run starts still saves and exits 0. (A file of its own
so the suite's two workers share the end-to-end training tests.)"""

import os
import signal
import subprocess
import time

import pytest

from tests.test_train_e2e import (  # noqa: F401  (_compilation_cache: the shared XLA cache)
    RESUME_CONFIG, ROOT, _checkpoint_steps, _command, _compilation_cache, _env, _rows, _train)

pytestmark = pytest.mark.slow


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_stop_together_on_one_sigterm_then_resume_in_one_process(tmp_path):
  """Real multi-host: two JAX processes on localhost (4 CPU devices each) train together, only
  process 0 writing metrics. A preemption notice seen by one host only must stop both at the same
  step, saved together, exit 0; one 8-device process then resumes their checkpoint, losing and
  repeating no step. Every step's losses equal those of one 8-device process running straight
  through: the two hosts read the halves of the same global batches."""
  workdir = str(tmp_path / "pair")
  schedule = "--config.optim.schedule_steps=300"  # the same learning rate at every step below
  flags = ["--config.total_steps=300", "--config.log_every=1", "--config.checkpoint_every=1000",
           schedule, f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2"]
  config = RESUME_CONFIG
  processes = [subprocess.Popen(_command(workdir, *flags, f"--process_id={i}", config=config),
                                env=_env(4), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(2)]
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and processes[0].poll() is None:
    if os.path.exists(metrics) and len(open(metrics).readlines()) >= 5:
      break
    time.sleep(0.05)
  processes[1].send_signal(signal.SIGTERM)  # only the second host is told
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
  stopped = _checkpoint_steps(workdir)
  assert len(stopped) == 1 and 5 <= stopped[0] < 300, stopped
  assert "SIGTERM: saved step %d" % stopped[0] in outputs[0] + outputs[1]
  assert "step %d/300" % stopped[0] in outputs[0] and "step %d/300" % stopped[0] not in outputs[1]
  assert [r["step"] for r in _rows(workdir)] == list(range(1, stopped[0] + 1))

  last = stopped[0] + 3
  _train(workdir, f"--config.total_steps={last}", "--config.log_every=1", schedule,
         config=config, devices=8)
  assert [r["step"] for r in _rows(workdir)] == list(range(1, last + 1))

  single = str(tmp_path / "single")
  _train(single, f"--config.total_steps={last}", "--config.log_every=1", schedule,
         config=config, devices=8)
  for pair_row, single_row in zip(_rows(workdir), _rows(single), strict=True):
    for key in ("loss", "loss/contrastive", "loss/seg"):
      assert pair_row[key] == pytest.approx(single_row[key], rel=1e-5), (pair_row["step"], key)


def test_sigterm_while_the_run_starts_saves_and_exits_zero(tmp_path):
  workdir = str(tmp_path / "early")
  process = subprocess.Popen(_command(workdir, "--config.total_steps=50",
                                      config=RESUME_CONFIG),
                             env=_env(8), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  time.sleep(2.0)  # importing JAX and TensorFlow: long before the first step
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 0, output[-3000:]
  assert _checkpoint_steps(workdir) == [1]
