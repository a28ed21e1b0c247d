r"""The README's main job: CLIPTeX on the built-in toy world, tiny towers, a few minutes on 2 CPU
cores, loss clearly falling.

  python tools/train.py --config configs/demo.py --workdir workdirs/demo
  python tools/train.py --config configs/demo.py:tasks=none --workdir workdirs/demo_clipft
  python tools/report.py --workdirs workdirs/demo_clipft workdirs/demo --out reports/demo

The toy-world shards and a BPE tokenizer trained on their captions are created inside the workdir
on the first run. `runlocal` shrinks it further to a seconds-long smoke run.
"""

from clipzoo_jax import cli
from clipzoo_jax import config_args
from clipzoo_jax import config_base
from clipzoo_jax.evals import presets

ARGS = dict(tasks="seg+depth+normals+det", steps=300, batch_size=32, evals="toyworld",
            eval_every=100, runlocal=False)


def get_config(arg=None):
  args = config_args.parse_arg(arg, **ARGS)
  config = config_base.demo_config(config_args.parse_tasks(args.tasks))
  config.total_steps = args.steps
  config.global_batch_size = args.batch_size
  # zero-shot, retrieval and seg / depth probes on held-out toy-world scenes (evals=none: no
  # evaluators); eval_every=0: at the end only
  if args.evals not in ("toyworld", "none"):
    raise cli.UserError(f"configs/demo.py: evals expected 'toyworld' or 'none', found "
                        f"{args.evals!r}")
  if args.evals == "toyworld":
    config.evals = presets.toyworld_evals(args.eval_every, config.model.image.image_size)
  if args.runlocal:
    config_base.make_local(config)
    if args.evals == "toyworld":
      config.evals = presets.toyworld_evals(0, config.model.image.image_size, batch_size=16,
                                            probe_steps=10)
  return config


def sweep(add, arg=None):
  del arg
  add(name="clip_ft", arg="tasks=none")
  add(name="cliptex", arg="tasks=seg+depth+normals+det")
