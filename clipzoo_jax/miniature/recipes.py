"""The miniature's pre-training recipe: "a CLIP pre-trained on captions only", the starting point
that CLIP-FT and CLIPTeX then fine-tune (issue 15).

It has to be a real CLIP, one whose zero-shot accuracy is far above chance, or comparing the two
fine-tunes says nothing; and it has to train in a few minutes on 2 CPU cores. Measured on this
recipe (2 shared CPU cores, load average 4-7; zero-shot over 30 classes, chance 0.033):
  full  (1100 steps): zero-shot top-1 0.25, colour-only top-1 0.67, retrieval R@1 0.35 / 0.34
                      (image->text / text->image), R@10 0.74 / 0.94; 4:42 wall, 3:50 of it in
                      training steps (about 300 images/s on the shared cores)
  quick  (200 steps, 2048 scenes; at 370 steps: zero-shot top-1 0.14, colour-only 0.39, retrieval R@1 0.04); 1:41 wall, 1:00
                      in training steps
  (the 4096 training scenes already written; writing them takes another 15-30 s)
What mattered, all measured at the same number of examples seen unless said:
- examples seen: 38k (1200 x 32 or 300 x 128) gave zero-shot 0.12 whatever the batch; 70k here;
- the temperature starting at 1/50 rather than CLIP's 1/14.3: the loss leaves its ln(batch)
  plateau sooner; learning rate 2e-3 beat 1e-3, and 3e-3 trained worse (loss 3.5 vs 1.7 at step
  640);
- augmentation that keeps captions true: no flips (captions say left and right) and crops that
  keep nearly the whole image (a caption names every object; a half-area crop cuts some off).
Captions did not need de-duplicating: the toy world's captions now rarely repeat within a batch.
"""

from __future__ import annotations

import math

import ml_collections

from clipzoo_jax import config_base
from clipzoo_jax.evals import presets

PRETRAIN_SEED = 0  # toy-world seed of the clean captioned split (evaluators use 1001-1004)
PRETRAIN_EXAMPLES = 4096
STEPS = 1100
QUICK_STEPS = 200
BATCH_SIZE = 64


def caption_evals(image_size: int) -> ml_collections.ConfigDict:
  """The toy-world zero-shot and retrieval evaluators, once at the end (no dense probes: a model
  trained on captions only is compared on those after fine-tuning)."""
  evals = presets.toyworld_evals(0, image_size)
  del evals["seg_probe"], evals["depth_probe"]
  return evals


def pretrain_config(data_dir: str, quick: bool) -> ml_collections.ConfigDict:
  """The trainer config that pre-trains the miniature's CLIP on clean captioned toy-world scenes
  written to (or read from) `data_dir`; `quick`: a fifth of the steps on half the scenes, for
  CI."""
  config = config_base.demo_config(tasks=[])
  config.data.directory = data_dir
  config.data.toyworld.seed = PRETRAIN_SEED
  config.data.toyworld.num_examples = PRETRAIN_EXAMPLES // 2 if quick else PRETRAIN_EXAMPLES
  config.data.flip_probability = 0.0
  config.data.crop_scale = (0.9, 1.0)
  config.global_batch_size = BATCH_SIZE
  config.total_steps = QUICK_STEPS if quick else STEPS
  config.checkpoint_every = config.total_steps
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 50
  config.model.logit_scale_init = math.log(50.0)  # 1 / 0.02: leaves the ln(batch) plateau sooner
  config.evals = caption_evals(config.model.image.image_size)
  return config
