"""The fine-tuning recipe of the paper in miniature, and the evaluators every stage shares.

CLIPTeX and CLIP-FT differ only in `tasks`: same pre-trained towers, data, schedule, seed and
evaluators, so a difference in the results is the pseudo-labels' doing."""

from __future__ import annotations

import ml_collections

from clipzoo_jax.data import toyworld
from clipzoo_jax.evals import presets
from clipzoo_jax.miniature import recipes

PROBE_TASKS = ("seg", "depth", "normals", "det")


def evals_config(image_size: int, quick: bool) -> ml_collections.ConfigDict:
  """Zero-shot (object and colour), retrieval and a linear probe per dense task on held-out
  labelled toy-world splits, at the end of a run only."""
  evals = presets.toyworld_evals(0, image_size, probe_steps=50 if quick else 200,
                                 probe_tasks=PROBE_TASKS, cache_features=True)
  for task in ("seg", "depth", "normals"):  # kept for the picture of probe predictions
    evals[f"{task}_probe"].save_examples = 3
  return evals


def finetune_config(data_dir: str, init: str, tasks, quick: bool) -> ml_collections.ConfigDict:
  """Fine-tunes the pre-trained CLIP at `init` (a Hugging Face folder with its tokenizer) on the
  pseudo-labelled `data_dir`; `tasks` empty is CLIP-FT. Towers and tokenizer are the
  pre-training's (`recipes.pretrain_config`), so the pre-trained weights load as they are."""
  config = recipes.pretrain_config(data_dir, quick)
  config.data.toyworld = None  # the pseudo-labelled corpus: never generate data here
  config.model_init, config.model_init_format = init, "hf"
  config.tokenizer.directory, config.tokenizer.train_vocab_size = init, None
  heads = config.model.heads
  heads.tasks = list(tasks)
  heads.num_seg_classes = len(toyworld.SEG_CLASSES)
  heads.num_det_classes = len(toyworld.DET_CLASSES)
  heads.hidden = 32
  config.loss.weights = {task: 1.0 for task in tasks}
  config.total_steps = 40 if quick else 150
  config.checkpoint_every = config.total_steps
  config.log_every = 10
  config.optim.learning_rate = 3e-4
  config.optim.warmup_steps = 10
  # fresh heads learn faster than the pre-trained towers
  config.optim.lr_multipliers = [[r"^heads/", 10.0]] if tasks else []
  config.evals = evals_config(config.model.image.image_size, quick)
  return config
