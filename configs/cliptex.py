r"""CLIPTeX: fine-tune a pre-trained CLIP on pseudo-labelled image-text data (the paper's recipe).

  python tools/train.py --config configs/cliptex.py:variant=B/16,tasks=seg+depth+normals+det \
      --workdir /mnt/shared/run --config.data.directory=/mnt/shared/cc3m_labels \
      --config.model_init=/path/to/clip-vit-base-patch16 \
      --config.tokenizer.directory=/path/to/clip-vit-base-patch16

`tasks=none` is the CLIP-FT baseline: same data and schedule, no pseudo-labels. `runlocal` shrinks
everything to a CPU-sized check on the built-in toy world. Loss weights: `w_seg=1.0`, ...

Evaluators (config.evals): with `eval_data_dir=DIR` (prepared TFDS datasets) the paper's set,
ImageNet zero-shot, ADE20K seg probes, NYU-v2 depth and COCO detection probes; without it the
offline toy-world set. Every `eval_every` steps (0: at the end only) and at the end.
"""

from clipzoo_jax import config_args
from clipzoo_jax import config_base
from clipzoo_jax.evals import presets
from clipzoo_jax.models import variants

ARGS = dict(variant="B/16", tasks="seg+depth+normals+det", image_size=224, batch_size=4096,
            epochs=30.0, num_examples=2_900_000, lr=1e-4, w_seg=1.0, w_depth=1.0,
            w_normals=1.0, w_det=1.0, num_seg_classes=150, num_det_classes=80, eval_data_dir="",
            eval_every=5000, runlocal=False)


def get_config(arg=None):
  args = config_args.parse_arg(arg, **ARGS)
  tasks = config_args.parse_tasks(args.tasks)
  config = config_base.base_config()
  config.model = variants.model_config(
      args.variant, image_size=args.image_size, tasks=tasks,
      num_seg_classes=args.num_seg_classes, num_det_classes=args.num_det_classes)
  config.model.dtype = "bfloat16"
  config.model.scan_layers = True
  config.model.remat = "dots_with_no_batch_dims_saveable"
  grid = config.model.image.image_size // config.model.image.patch_size
  config.data = config_base.data_config(
      directory="", image_size=config.model.image.image_size,
      label_size=grid * config.model.heads.upsample)
  config.data.toyworld = None
  # A pod host feeds 4-8 chips at ~300 decoded 224 px examples/s per worker core
  # (benchmarks/input_pipeline.py); 16 workers keep a B/16 step fed with room to spare.
  config.data.num_workers = 16
  config.tokenizer.directory = ""  # the pre-trained CLIP folder's tokenizer files
  config.tokenizer.train_vocab_size = None
  config.tokenizer.context_length = 77
  config.model_init = ""  # HF CLIPModel folder, OpenAI or open_clip state dict
  config.global_batch_size = args.batch_size
  config.total_steps = max(int(args.epochs * args.num_examples / args.batch_size), 1)
  config.log_every = 50
  config.checkpoint_every = 1000
  config.mesh = [-1, 1, 1]  # pure data parallel by default; set fsdp for large towers
  config.optim.learning_rate = args.lr
  config.optim.warmup_steps = min(2000, config.total_steps // 10)
  if tasks:  # fresh heads learn faster than the towers (CLIP-FT has no heads to match)
    config.optim.lr_multipliers = [[r"^heads/", 10.0]]
  config.loss.weights = {t: args[f"w_{t}"] for t in tasks}
  if args.eval_data_dir:
    config.evals = presets.tfds_evals(args.eval_data_dir, args.eval_every)
  else:
    config.evals = presets.toyworld_evals(args.eval_every, config.model.image.image_size)
  if args.runlocal:
    config_base.make_local(config)
    config.evals = presets.toyworld_evals(0, config.model.image.image_size, batch_size=16,
                                          probe_steps=10)
  return config


def sweep(add, arg=None):
  """CLIP-FT vs CLIPTeX and the per-expert ablation of the paper, on the same data/schedule."""
  del arg
  for tasks in ("none", "seg+depth+normals+det", "seg", "depth", "normals", "det"):
    add(name=f"tasks={tasks}", arg=f"tasks={tasks}")
