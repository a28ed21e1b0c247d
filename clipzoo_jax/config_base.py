"""Config pieces shared by the experiment files in configs/: defaults of every key the trainer
reads, the demo's CPU-sized setup on the built-in toy world, and the `runlocal` shrink."""

from __future__ import annotations

import ml_collections

from clipzoo_jax.data import toyworld
from clipzoo_jax.models import variants


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 1000
  config.log_every = 10
  config.checkpoint_every = 100
  config.nonfinite = "stop"  # or "skip": a step with a non-finite loss or update is not applied
  config.keep_checkpoints = 3
  config.async_checkpointing = True
  config.global_batch_size = 32
  config.grad_accum_steps = 1  # micro-batches per step (same loss and gradient; less memory)
  config.mesh = [-1, 1, 1]          # sizes of ('data', 'fsdp', 'tensor'); one -1 fills
  config.mesh_allow_shrink = False  # True: fixed sizes shrink to fit fewer devices (demo only)
  config.sharding_rules = []        # [[logical_name, mesh_axes], ...] replacing defaults
  config.model_init = ""
  config.model_init_format = "auto"
  config.tokenizer = ml_collections.ConfigDict(dict(
      directory="tokenizer", context_length=77,
      train_vocab_size=ml_collections.FieldReference(None, field_type=int),
      train_on_examples=20000))
  # contrastive: 'softmax' (CLIP) or 'sigmoid' (SigLIP; needs model.logit_bias_init);
  # contrastive_chunk: rows of the contrastive logits computed at a time (0: all at once)
  config.loss = ml_collections.ConfigDict(dict(weights={}, depth="ssi", contrastive="softmax",
                                               contrastive_chunk=0))
  config.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, warmup_steps=100,
      end_lr_factor=0.0, grad_clip_norm=1.0, freeze=[], lr_multipliers=[],
      schedule_steps=0))  # 0: warmup + cosine over total_steps
  config.evals = ml_collections.ConfigDict()  # name -> evaluator options (clipzoo_jax/evals)
  return config


def data_config(directory: str, image_size: int, label_size: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      directory=directory, image_size=image_size, label_size=label_size, max_boxes=16,
      crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3), min_box_area_fraction=0.25,
      color_jitter=0.0,
      # the input pipeline (clipzoo_jax/data/pipelines.py): "grain" (random access, worker
      # processes, constant-time resume) or "tfdata" (the earlier tf.data reader)
      loader="grain", num_workers=2, worker_buffer=2, threads=2, max_bad_fraction=0.001,
      shuffle_buffer=2048,  # tfdata only
      sources=ml_collections.ConfigDict(),  # mixture: name -> {directory, weight}
      toyworld=ml_collections.ConfigDict(dict(num_examples=2048, size=64, num_shards=8, seed=0))))


def demo_config(tasks) -> ml_collections.ConfigDict:
  """Tiny towers on 64 px toy-world images: a few minutes on 2 CPU cores."""
  config = base_config()
  config.total_steps = 300
  config.log_every = 10
  config.checkpoint_every = 100
  config.global_batch_size = 32
  config.grad_accum_steps = 1  # micro-batches per step (same loss and gradient; less memory)
  config.mesh = [-1, 2, 1]
  config.mesh_allow_shrink = True
  config.tokenizer.directory = "tokenizer"
  config.tokenizer.context_length = 24
  config.tokenizer.train_vocab_size = 1024
  config.model = variants.model_config(
      "mu/8", image_size=64, tasks=tasks, num_seg_classes=len(toyworld.SEG_CLASSES),
      num_det_classes=len(toyworld.DET_CLASSES), vocab_size=1024, context_length=24)
  # heads as wide as the towers: at this size they hold most of the model's capacity, and 32
  # wide (the default) raised the demo's seg and det losses 3-4% (issue 11)
  config.model.heads.hidden = 64
  config.data = data_config("data/toyworld", image_size=64, label_size=32)
  config.loss.weights = {t: 1.0 for t in tasks}
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 20
  config.optim.weight_decay = 0.05
  return config


def shape_config(variant: str, tasks, batch_size: int, depth: int | None = None,
                 image_size: int = 224) -> ml_collections.ConfigDict:
  """The train step of `variant` towers (`depth` layers in both towers when given) on synthetic
  batches, for step benchmarks and FLOP checks: 150 seg and 80 det classes, labels at the heads'
  size, context 77, the demo's other keys. `shape_config("S/16", tasks, 32, depth=6)` is the
  41M-parameter reference shape of issue 11."""
  config = demo_config(tasks)
  config.model = variants.model_config(variant, image_size=image_size, tasks=tasks,
                                       num_seg_classes=150, num_det_classes=80)
  if depth:
    config.model.image.depth = config.model.text.depth = depth
  grid = config.model.image.image_size // config.model.image.patch_size
  config.data.image_size = config.model.image.image_size
  config.data.label_size = grid * config.model.heads.upsample
  config.global_batch_size = batch_size
  config.tokenizer.context_length = config.model.text.context_length
  return config


def make_local(config: ml_collections.ConfigDict) -> None:
  """`runlocal`: the same code path at toy size, for a quick check on a laptop."""
  tasks = list(config.model.heads.tasks)
  demo = demo_config(tasks)
  config.model = demo.model
  config.data = demo.data
  config.data.toyworld.num_examples = 256
  config.data.toyworld.num_shards = 2
  config.tokenizer = demo.tokenizer
  config.model_init = ""
  config.mesh = demo.mesh
  config.mesh_allow_shrink = True
  config.global_batch_size = 16
  config.total_steps = 10
  config.log_every = 2
  config.checkpoint_every = 5
  config.optim.warmup_steps = 2
  config.optim.lr_multipliers = []
