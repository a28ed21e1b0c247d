r"""Run every point of a config's sweep locally, in sequence, one workdir per point.

  python tools/sweep.py --config configs/demo.py --workdir workdirs/sweep [--dry_run] \
      [-- --config.total_steps=40]

Each point runs `tools/train.py` with its own flags (plus any after `--`); finished points resume
(a no-op when already at total_steps), so rerunning a sweep is safe.
"""

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from clipzoo_jax import cli  # noqa: E402
from clipzoo_jax import sweep  # noqa: E402


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="configs/file.py[:args] with sweep()")
  parser.add_argument("--workdir", required=True, help="parent directory of the points' workdirs")
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  args, extra = parser.parse_known_args(argv)
  extra = [e for e in extra if e != "--"]
  points = sweep.expand(args.config)
  for index, point in enumerate(points):
    command = [sys.executable, os.path.join(ROOT, "tools", "train.py"), *point.flags(),
               f"--workdir={os.path.join(args.workdir, point.name)}", *extra]
    print(f"[{index + 1}/{len(points)}] {point.name}: {' '.join(command)}", flush=True)
    if not args.dry_run:
      subprocess.run(command, check=True)


if __name__ == "__main__":
  cli.run_argparse(main)
