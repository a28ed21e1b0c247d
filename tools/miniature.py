r"""The paper in miniature on the built-in toy world: CLIPTeX against CLIP-FT, end to end, offline.

  python tools/miniature.py --out workdirs/miniature            # about 15 minutes on 2 CPU cores
  python tools/miniature.py --out workdirs/miniature_quick --quick   # the CI-sized run
  python tools/miniature.py --out workdirs/miniature_seed7 --seed 7  # another seed throughout

Stages: a model zoo of real Hugging Face architectures trained on the toy world
(tools/build_demo_zoo.py) -> an uncurated image-caption corpus as webdataset tars -> its
pseudo-labels (tools/pseudo_label.py) -> a CLIP pre-trained on captions only -> CLIP-FT and
CLIPTeX fine-tunes over several seeds, and one fine-tune per single expert -> zero-shot,
retrieval and dense probes on held-out labelled splits -> CLIPTeX exported to Hugging Face with
a parity check -> `results.md`, `results.png`, `pseudo_labels.png`. Rerun the same command after
an interruption and it continues where it stopped.
"""

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("EPATH_USE_TF", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clipzoo_jax import stop_signal  # noqa: E402

stop_signal.install()

from absl import flags  # noqa: E402

from clipzoo_jax import cli  # noqa: E402

_OUT = flags.DEFINE_string("out", "workdirs/miniature", "directory of every output")
_QUICK = flags.DEFINE_bool("quick", False, "the CI-sized run: smaller data, shorter stages, "
                           "one fine-tune seed, no ablation")
_SEED = flags.DEFINE_integer("seed", 0, "shifts every seed: zoo, corpus, pre-training, fine-tunes")
_NUM_SEEDS = flags.DEFINE_integer("num_seeds", None, "fine-tune seeds per arm (default 3; 1 with "
                                  "--quick)", lower_bound=1)


def main(argv):
  del argv
  import jax
  from clipzoo_jax import train
  from clipzoo_jax.miniature import experiment
  quick = _QUICK.value
  settings = experiment.Settings(
      quick=quick, seed=_SEED.value,
      num_seeds=_NUM_SEEDS.value or (1 if quick else 3), ablation=not quick)
  out = os.path.abspath(_OUT.value)
  # The fine-tunes share their shapes: XLA's compiled steps are reused from disk across seeds.
  jax.config.update("jax_compilation_cache_dir", os.path.join(out, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  train.log.setLevel(logging.INFO)
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  train.log.addHandler(handler)
  train.log.propagate = False
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  experiment.Experiment(out, settings, log=lambda text: print(text, flush=True)).run()


if __name__ == "__main__":
  cli.run(main)
