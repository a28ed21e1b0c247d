r"""Run a config on a Cloud TPU VM (a single host or a pod slice) with gcloud.

  python tools/launch_tpu.py run --name clip-b16 --zone us-central2-b --project P \
      --accelerator_type v4-32 --spot --config configs/cliptex.py:variant=B/16 \
      --workdir /mnt/shared/runs/b16 [--dry_run] [-- --config.global_batch_size=8192]
  python tools/launch_tpu.py status|logs|stop|delete --name clip-b16 --zone us-central2-b

`run` creates the TPU VM when it does not exist (or was preempted: delete, create), syncs this
repository, installs requirements.txt + requirements-tpu.txt, and starts tools/train.py on every
worker, detached, logging to <repo_dir>/logs/<name>.log on each. Rerunning the same `run` after a
preemption resumes from the workdir's newest checkpoint. `create` only makes the VM; `logs` tails
one worker's log; `stop` sends SIGTERM (the trainer saves and exits); `delete` deletes the VM (or
the queued resource). --sweep: every point of the config's sweep() as its own job (TPU name
<name>-<point>, workdir <workdir>/<point>). --dry_run prints every command and runs none but the
read-only `describe` that decides the sequence.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clipzoo_jax import cli  # noqa: E402
from clipzoo_jax import launch  # noqa: E402

COMMANDS = ("create", "run", "status", "logs", "stop", "delete")


def parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("command", choices=COMMANDS)
  parser.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
  parser.add_argument("--zone", help="e.g. us-central2-b (v4), us-west4-a (v5e)")
  parser.add_argument("--project", help="GCP project (default: gcloud's configured project)")
  parser.add_argument("--accelerator_type", default="v4-8", help="v4-32, v5litepod-256, ...")
  parser.add_argument("--runtime_version", help="TPU VM software version (default: the "
                      "generation's: " + ", ".join(f"{k} {v}" for k, v in launch.RUNTIMES.items())
                      + ")")
  parser.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
  parser.add_argument("--queued", action="store_true", help="create through a queued resource")
  parser.add_argument("--config", help="configs/file.py[:args] (inside this repository)")
  parser.add_argument("--workdir", help="the run's workdir, one every host reaches: "
                      "gs://BUCKET/RUN or a shared mount (NFS, gcsfuse)")
  parser.add_argument("--repo_dir", default="clipzoo_jax", help="code directory on the VMs, "
                      "relative to the login's home")
  parser.add_argument("--sweep", action="store_true", help="one job per point of sweep()")
  parser.add_argument("--worker", type=int, default=0, help="logs: which worker's log")
  parser.add_argument("--lines", type=int, default=100, help="logs: how many lines")
  parser.add_argument("--follow", action="store_true", help="logs: keep following")
  parser.add_argument("--dry_run", action="store_true", help="print every command, run none")
  args, extra = parser.parse_known_args(argv)
  extra = [arg for arg in extra if arg != "--"]
  unknown = [arg for arg in extra if not arg.startswith("--config.")]
  if unknown:
    raise cli.UserError(f"unknown arguments {unknown[:3]}; only --config.KEY=VALUE overrides "
                        "pass through to the trainer")
  return args, tuple(extra)


def jobs_from_args(args, config_flags) -> list:
  if not args.zone:
    raise cli.UserError("--zone is required (e.g. us-central2-b for v4, us-west4-a for v5e)")
  needs_config = args.command == "run" or args.sweep
  if needs_config and not (args.config and args.workdir):
    raise cli.UserError(f"{args.command}{' --sweep' if args.sweep else ''} needs --config and "
                        "--workdir")
  job = launch.Job(
      name=launch.check_name(args.name), zone=args.zone, project=args.project,
      accelerator_type=args.accelerator_type,
      runtime_version=args.runtime_version or launch.default_runtime(args.accelerator_type),
      spot=args.spot, queued=args.queued,
      config=launch.config_in_repo(args.config) if args.config else "",
      config_flags=config_flags, workdir=args.workdir or "", repo_dir=args.repo_dir)
  return launch.sweep_jobs(job) if args.sweep else [job]


def main(argv):
  args, config_flags = parse(argv)
  shell = launch.Shell(args.dry_run)
  for job in jobs_from_args(args, config_flags):
    if args.command == "create":
      launch.ensure_vm(shell, job)
    elif args.command == "run":
      launch.launch(shell, job)
    elif args.command == "status":
      launch.status(shell, job)
    elif args.command == "logs":
      shell.run(launch.logs_command(job, args.worker, args.lines, args.follow))
    elif args.command == "stop":
      shell.run(launch.stop_command(job))
    else:
      launch.delete(shell, job)


if __name__ == "__main__":
  cli.run_argparse(main)
