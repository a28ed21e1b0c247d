r"""The paper in miniature (issue 15): the training stages of `tools/miniature.py`.

`tools/miniature.py --out DIR` runs these for you; each stage can also be run alone:

  # the "pre-trained CLIP": captions only, on a clean captioned toy-world split
  python tools/train.py --config configs/miniature.py:stage=pretrain,data_dir=DIR/pretrain_data \
      --workdir DIR/runs/pretrain
  # fine-tuning it on the pseudo-labelled corpus: CLIPTeX (all experts) and CLIP-FT (tasks=none)
  python tools/train.py --config configs/miniature.py:stage=finetune,tasks=seg+depth+normals+det,seed=0,data_dir=DIR/pseudo_labels,init=DIR/pretrained_clip \
      --workdir DIR/runs/cliptex_s0

`quick` shortens every stage (the CI-sized run). The evaluators (zero-shot, retrieval and the
four dense probes on held-out labelled toy-world splits) are the same in every stage, so the
three models are measured alike.
"""

from clipzoo_jax import cli
from clipzoo_jax import config_args
from clipzoo_jax.miniature import finetune
from clipzoo_jax.miniature import recipes

ARGS = dict(stage="pretrain", tasks="seg+depth+normals+det", seed=0, quick=False, data_dir="",
            init="", steps=0)


def get_config(arg=None):
  args = config_args.parse_arg(arg, **ARGS)
  if args.stage == "pretrain":
    # a clean captioned toy-world split, generated there on the first run (relative: in the workdir)
    config = recipes.pretrain_config(args.data_dir or "data/pretrain", args.quick)
  elif args.stage == "finetune":
    if not args.data_dir or not args.init:
      raise cli.UserError("configs/miniature.py: stage=finetune needs data_dir=DIR (the "
                          "pseudo-labelled corpus) and init=DIR (the pre-trained CLIP as a Hugging "
                          "Face folder, tools/convert.py export)")
    config = finetune.finetune_config(args.data_dir, args.init,
                                      config_args.parse_tasks(args.tasks), args.quick)
  else:
    raise cli.UserError(f"configs/miniature.py: stage expected 'pretrain' or 'finetune', found "
                        f"{args.stage!r}")
  config.seed = args.seed
  if args.steps:
    config.total_steps = args.steps
  return config


def sweep(add, arg=None):
  """The pre-training in both sizes; the fine-tune arms need a pre-trained CLIP and a
  pseudo-labelled corpus first: `tools/miniature.py` runs them all."""
  del arg
  add(name="pretrain", arg="stage=pretrain")
  add(name="pretrain_quick", arg="stage=pretrain,quick")
