"""Train the toy world's model zoo: a SegFormer, a metric Depth Anything and an RT-DETR on labelled
toy-world scenes, saved with save_pretrained as downloaded experts sit on disk, plus a report of
their held-out accuracy next to untrained twins (normals: the geometric expert on the depth one).

  python tools/build_demo_zoo.py --out=workdirs/zoo [--quick] [--seed=0]
  python tools/pseudo_label.py --config=configs/pseudo_label/demo_zoo.py:zoo_dir=workdirs/zoo \
      --corpus='tar:/data/toy/{00000..00007}.tar' --output_dir=/data/toy_pl

Rerunning the same command skips the experts already built; a directory built with other
settings (--quick, --seed) is refused. About 3 minutes on 2 CPU cores (--quick: 45 s).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags

from clipzoo_jax import cli

_OUT = flags.DEFINE_string("out", None, "zoo directory (one folder per expert + zoo.json)",
                           required=True)
_QUICK = flags.DEFINE_bool("quick", False, "a seconds-long build for CI (weaker experts)")
_SEED = flags.DEFINE_integer("seed", 0, "toy-world splits (2000+seed, 2100+seed) and init seed",
                             lower_bound=0)


def main(argv):
  del argv  # cli.run refuses positional arguments
  from transformers.utils import logging as transformers_logging
  from clipzoo_jax.miniature import zoo
  transformers_logging.disable_progress_bar()  # a bar per saved and loaded folder buries progress
  built = zoo.build_zoo(_OUT.value, quick=_QUICK.value, seed=_SEED.value,
                        log=lambda line: print(line, flush=True))
  print(zoo.report_table(built))
  print(f"wrote {os.path.join(_OUT.value, zoo.ZOO_FILE)}")


if __name__ == "__main__":
  cli.run(main)
