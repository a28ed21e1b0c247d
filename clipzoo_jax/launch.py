"""The commands that run a config on a Cloud TPU VM (tools/launch_tpu.py): create or reuse the VM,
sync the code, install the pinned requirements with the TPU extras, start the trainer on every
worker with a log per worker, and status, logs, stop and delete.

Everything here builds argument lists; one function (`Shell.run`) executes them, and prints them
shell-quoted instead under --dry_run. Resuming after a spot preemption is rerunning `run`: the
VM's state decides the sequence (missing: create; PREEMPTED: delete, create; READY: reuse), and the
trainer continues from the newest checkpoint in the workdir (gs://BUCKET/RUN, or a path every host
mounts, on multi-host pods).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

from clipzoo_jax import cli
from clipzoo_jax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the VMs need of this checkout (no workdirs, data or tests).
SYNCED = ("clipzoo_jax", "configs", "tools", "pyproject.toml", "requirements.txt",
          "requirements-tpu.txt")
# Accelerator-type prefix -> default TPU VM runtime (software version) of that generation.
RUNTIMES = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# torch is pinned to its CPU build (requirements.txt); PyPI alone would pull the CUDA one.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
GONE_STATES = ("PREEMPTED", "TERMINATED", "FAILED", "SUSPENDED", "SUSPENDING")  # delete, create
READY_STATES = ("READY", "ACTIVE")  # a TPU VM, a queued resource
NOT_FOUND = "NOT_FOUND"


@dataclasses.dataclass
class Job:
  """One training job on one TPU VM (or queued resource) of the same name."""
  name: str
  zone: str
  project: str | None
  accelerator_type: str
  runtime_version: str
  spot: bool = False
  queued: bool = False
  config: str = ""                     # "configs/file.py[:args]", relative to the repo root
  config_flags: tuple[str, ...] = ()   # "--config.key=value" passed to the trainer
  workdir: str = ""
  repo_dir: str = "clipzoo_jax"        # on the VMs, relative to the login's home directory

  @property
  def log(self) -> str:
    return f"logs/{self.name}.log"     # inside repo_dir, on every worker's own disk

  @property
  def pid_file(self) -> str:
    return f"logs/{self.name}.pid"


def check_name(name: str) -> str:
  if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name or ""):
    raise cli.UserError(f"--name {name!r}: a TPU name is lowercase letters, digits and hyphens, "
                        "starts with a letter, at most 63 characters")
  return name


def default_runtime(accelerator_type: str) -> str:
  """The runtime of `v4-32`, `v5litepod-256`, ...; an unknown type is a user error."""
  match = re.fullmatch(r"([a-z0-9]+)-(\d+)", accelerator_type or "")
  if not match or match.group(1) not in RUNTIMES:
    raise cli.UserError(f"--accelerator_type {accelerator_type!r}: expected TYPE-CORES with TYPE "
                        f"in {sorted(RUNTIMES)}, e.g. v4-32 or v5litepod-256")
  return RUNTIMES[match.group(1)]


def config_in_repo(config: str) -> str:
  """'configs/x.py:args' relative to the repo root, which is what the VMs receive."""
  path, colon, arg = config.partition(":")
  if not os.path.isfile(path):
    raise cli.UserError(f"--config {config}: config file {path} not found")
  relative = os.path.relpath(os.path.abspath(path), ROOT)
  if relative.startswith(".."):
    raise cli.UserError(f"--config {config}: the config must be inside the repository {ROOT} "
                        "(only the repository is synced to the TPU VMs)")
  return relative + colon + arg


def sweep_jobs(job: Job) -> list[Job]:
  """One job per point of the config's sweep(): TPU name `NAME-POINT`, workdir `WORKDIR/POINT`."""
  jobs, names = [], set()
  for point in sweep.expand(job.config):
    suffix = re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", point.name.lower())).strip("-")
    name = f"{job.name}-{suffix}"[:63].rstrip("-")
    if name in names:
      raise cli.UserError(f"--sweep: points of {job.config} give the same TPU name {name!r}; "
                          "use a shorter --name or distinct sweep point names")
    names.add(name)
    jobs.append(dataclasses.replace(
        job, name=name, config=point.config, workdir=f"{job.workdir.rstrip('/')}/{point.name}",
        config_flags=tuple(point.flags()[1:]) + job.config_flags))
  return jobs


# -- commands --------------------------------------------------------------------------------------

def _where(job: Job) -> list[str]:
  return [f"--zone={job.zone}"] + ([f"--project={job.project}"] if job.project else [])


def tpu_vm(job: Job, verb: str, *args: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, job.name, *_where(job), *args]


def queued_resource(job: Job, verb: str, *args: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", verb, job.name, *_where(job), *args]


def describe_command(job: Job) -> list[str]:
  if job.queued:
    return queued_resource(job, "describe", "--format=value(state.state)")
  return tpu_vm(job, "describe", "--format=value(state)")


def create_command(job: Job) -> list[str]:
  spot = ["--spot"] if job.spot else []
  if job.queued:
    return queued_resource(job, "create", f"--node-id={job.name}",
                           f"--accelerator-type={job.accelerator_type}",
                           f"--runtime-version={job.runtime_version}", *spot)
  return tpu_vm(job, "create", f"--accelerator-type={job.accelerator_type}",
                f"--version={job.runtime_version}", *spot)


def delete_command(job: Job) -> list[str]:
  if job.queued:  # --force also deletes the TPU VM the queued resource made
    return queued_resource(job, "delete", "--force", "--quiet")
  return tpu_vm(job, "delete", "--quiet")


def ssh_command(job: Job, script: str, worker: str = "all") -> list[str]:
  return tpu_vm(job, "ssh", f"--worker={worker}", f"--command={script}")


def archive_path(job: Job) -> str:
  return f"/tmp/clipzoo_jax-{job.name}.tar.gz"


def sync_commands(job: Job) -> list[list[str]]:
  """Pack the repository's code, copy it to every worker, unpack it into repo_dir."""
  remote = archive_path(job)
  present = [item for item in SYNCED if os.path.exists(os.path.join(ROOT, item))]
  repo = shlex.quote(job.repo_dir)
  return [["tar", "czf", archive_path(job), "--exclude=__pycache__", "-C", ROOT, *present],
          ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive_path(job),
           f"{job.name}:{remote}", "--worker=all", *_where(job)],
          ssh_command(job, f"mkdir -p {repo} && tar xzf {remote} -C {repo}")]


def install_command(job: Job) -> list[str]:
  return ssh_command(job, f"cd {shlex.quote(job.repo_dir)} && python3 -m pip install -q "
                     f"--extra-index-url {TORCH_CPU_INDEX} -r requirements.txt "
                     "-r requirements-tpu.txt && python3 -m pip install -q --no-deps -e .")


def train_command(job: Job) -> str:
  return shlex.join(["python3", "tools/train.py", f"--config={job.config}",
                     f"--workdir={job.workdir}", *job.config_flags])


def start_command(job: Job) -> list[str]:
  """The trainer on every worker, detached, its output in the worker's own log; refuses to start
  a second trainer beside a running one."""
  pid = job.pid_file
  script = (f"cd {shlex.quote(job.repo_dir)} || exit 1; mkdir -p logs; "
            f"if [ -f {pid} ] && kill -0 $(cat {pid}) 2>/dev/null; then "
            f"echo \"{job.name}: already training (pid $(cat {pid}))\"; exit 1; fi; "
            f"nohup {train_command(job)} >> {job.log} 2>&1 < /dev/null & echo $! > {pid}")
  return ssh_command(job, script)


def status_script(job: Job) -> str:
  pid = job.pid_file
  return (f"cd {shlex.quote(job.repo_dir)} && if [ -f {pid} ] && kill -0 $(cat {pid}) "
          f"2>/dev/null; then echo \"$(hostname): training\"; else echo \"$(hostname): not "
          f"training\"; fi; tail -n 1 {job.log} 2>/dev/null")


def logs_command(job: Job, worker: int, lines: int, follow: bool) -> list[str]:
  follow_flag = " -f" if follow else ""
  return ssh_command(job, f"tail -n {lines}{follow_flag} {shlex.quote(job.repo_dir)}/{job.log}",
                     worker=str(worker))


def stop_command(job: Job) -> list[str]:
  """SIGTERM to the trainer on every worker: it saves a checkpoint at the current step and exits."""
  pid = job.pid_file
  return ssh_command(job, f"cd {shlex.quote(job.repo_dir)} && if [ -f {pid} ]; then "
                     f"kill -TERM $(cat {pid}) 2>/dev/null || true; fi")


# -- execution -------------------------------------------------------------------------------------

class Shell:
  """Runs commands, or under dry_run prints each one shell-quoted and runs nothing but the
  read-only `describe` queries that decide what comes next (a missing gcloud: NOT_FOUND)."""

  def __init__(self, dry_run: bool, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout

  def run(self, command: list[str], query: bool = False, check: bool = True):
    """CompletedProcess (stdout captured for queries), or None for a command not run."""
    if self.dry_run:
      print(f"{'# query: ' if query else ''}{shlex.join(command)}", file=self.out, flush=True)
      if not query or shutil.which(command[0]) is None:
        return None
    result = subprocess.run(command, check=False, text=True,
                            capture_output=query)  # noqa: S603  (argument lists, no shell)
    if check and not query and result.returncode:
      raise cli.UserError(f"command failed (exit {result.returncode}): {shlex.join(command)}")
    return result

  def state(self, job: Job) -> str:
    """The TPU VM's (or queued resource's) state, or NOT_FOUND."""
    result = self.run(describe_command(job), query=True)
    if result is None:
      return NOT_FOUND
    if result.returncode:
      if NOT_FOUND in result.stderr or "not found" in result.stderr.lower():
        return NOT_FOUND
      reason = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
      if self.dry_run:
        self.note(f"describe failed ({reason}); assuming not found")
        return NOT_FOUND
      raise cli.UserError(f"{shlex.join(describe_command(job))} failed: {reason}")
    return result.stdout.strip() or NOT_FOUND

  def note(self, text: str) -> None:
    print(f"# {text}", file=self.out, flush=True)


def ensure_vm(shell: Shell, job: Job, poll_s: float = 30, timeout_s: float = 3600) -> None:
  """Creates the TPU VM if it is missing, recreates it if it was preempted, waits until ready."""
  state = shell.state(job)
  if state in GONE_STATES:
    shell.note(f"{job.name}: {state}; deleting and creating it again (the trainer resumes from "
               f"{job.workdir or 'the workdir'})")
    shell.run(delete_command(job))
    state = NOT_FOUND
  if state == NOT_FOUND:
    shell.note(f"{job.name}: not found; creating {job.accelerator_type}")
    shell.run(create_command(job))
  elif state in READY_STATES:
    shell.note(f"{job.name}: {state}; reusing it")
  if shell.dry_run:
    return
  deadline = time.monotonic() + timeout_s
  while (state := shell.state(job)) not in READY_STATES:
    if state in GONE_STATES or time.monotonic() > deadline:
      raise cli.UserError(f"{job.name}: state {state} while waiting for it to become ready")
    shell.note(f"{job.name}: {state}; waiting")
    time.sleep(poll_s)


def launch(shell: Shell, job: Job) -> None:
  """`run`: the VM (created or recreated as needed), the code, the install, the trainer."""
  ensure_vm(shell, job)
  for command in sync_commands(job):
    shell.run(command)
  shell.run(install_command(job))
  shell.run(start_command(job))
  shell.note(f"{job.name}: training into {job.workdir}; logs: tools/launch_tpu.py logs "
             f"--name={job.name} --zone={job.zone}")


def status(shell: Shell, job: Job) -> None:
  state = shell.state(job)
  print(f"{job.name}: {state}", file=shell.out, flush=True)
  if state in READY_STATES or shell.dry_run:
    shell.run(ssh_command(job, status_script(job)), check=False)


def delete(shell: Shell, job: Job) -> None:
  if shell.state(job) == NOT_FOUND and not shell.dry_run:
    shell.note(f"{job.name}: not found; nothing to delete")
    return
  shell.run(delete_command(job))
