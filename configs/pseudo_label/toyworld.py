"""Pseudo-label a toy-world corpus with the generator's ground truth as the "experts".

Exercises the whole job without any model: e.g.
  python tools/pseudo_label.py --config=configs/pseudo_label/toyworld.py:tasks=seg+depth \
      --corpus='tar:/data/toyworld/{00000..00003}.tar' --output_dir=/data/toyworld_pl
"""

import ml_collections

from clipzoo_jax.config_args import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, tasks="seg+depth+normals+det", label_scale=1.0, batch_size=32,
                  records_per_shard=0, corpus="")
  config = ml_collections.ConfigDict()
  config.experts = {task: {"kind": "toyworld", "label_scale": arg.label_scale}
                    for task in arg.tasks.split("+")}
  config.corpus = {"kind": "tar", "pattern": arg.corpus or None,
                   "records_per_shard": arg.records_per_shard or None}
  config.job = {"batch_size": arg.batch_size, "decode_threads": 2, "prefetch_batches": 4,
                "split": "train", "jpeg_quality": 95, "progress_every_s": 10.0}
  return config
