r"""Run a config's evaluators (config.evals) standalone, or compare runs.

  python tools/evaluate.py --workdir W [--step N] [--config configs/demo.py]
  python tools/evaluate.py --workdir W --config configs/cliptex.py:variant=B/16 \
      --init /path/clip-vit-base-patch16
  python tools/evaluate.py --compare W1 W2 W3 --out reports/

A checkpoint's results are merged into step N's row of W/metrics.jsonl (the newest checkpoint
unless --step); --init measures a pre-trained CLIP (Hugging Face folder, OpenAI .pt or open_clip
state dict) and writes step 0. Without --config the workdir's saved config.json is used.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("EPATH_USE_TF", "false")  # gs:// workdirs: Orbax on gcsfs, as tools/train.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from clipzoo_jax import cli  # noqa: E402
from clipzoo_jax import config_args  # noqa: E402

config_args.allow_list_overrides()

config_flags.DEFINE_config_file("config", None, "Config file, optionally with :args (default: "
                                "the workdir's config.json).", lock_config=False)
flags.DEFINE_string("workdir", None, "The run's workdir: checkpoints in, metrics.jsonl out.")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest).")
flags.DEFINE_string("init", None, "Evaluate this pre-trained CLIP instead of a checkpoint.")
flags.DEFINE_string("init_format", "auto", "Format of --init: auto, hf, openai, open_clip.")
flags.DEFINE_list("compare", None, "Workdirs to compare (the first is the baseline).")
flags.DEFINE_list("names", None, "With --compare: a name per workdir (default: folder names).")
flags.DEFINE_string("out", "report", "With --compare: output directory of report.md/.png.")


def main(argv):
  from clipzoo_jax.evals import report, standalone
  flag = flags.FLAGS
  if flag.compare:  # `--compare W1 W2 W3`: the workdirs after the first arrive as arguments
    md_path, png_path = report.compare(list(flag.compare) + list(argv[1:]), flag.out, flag.names)
    with open(md_path) as f:
      print(f.read())
    print(f"wrote {md_path} and {png_path}")
    return
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:4]}: only --compare takes a list of "
                        "workdirs")
  if not flag.workdir:
    raise cli.UserError("--workdir is required (or --compare W1 W2 ...)")
  step, results = standalone.evaluate(flag.config, flag.workdir, flag.step, flag.init,
                                      flag.init_format)
  print(standalone.format_table(step, results))


if __name__ == "__main__":
  cli.run(main, positional=True)
