r"""Compare runs: a markdown table and a PNG bar chart of each run's latest evaluator metrics,
with the relative change of each metric vs the first run.

  python tools/report.py --workdirs workdirs/demo_clipft workdirs/demo --out reports/demo

Workdirs may follow --workdirs separated by spaces or commas.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from clipzoo_jax import cli  # noqa: E402

flags.DEFINE_list("workdirs", None, "Run workdirs; the first is the baseline.")
flags.DEFINE_list("names", None, "A name per workdir (default: the folder names).")
flags.DEFINE_string("out", "report", "Output directory for report.md and report.png.")
flags.mark_flags_as_required(["workdirs"])


def main(argv):
  from clipzoo_jax.evals import report
  workdirs = list(flags.FLAGS.workdirs) + list(argv[1:])  # `--workdirs W1 W2 W3`
  md_path, png_path = report.compare(workdirs, flags.FLAGS.out, flags.FLAGS.names)
  with open(md_path) as f:
    print(f.read())
  print(f"wrote {md_path} and {png_path}")


if __name__ == "__main__":
  cli.run(main, positional=True)
