"""Pseudo-label a toy-world corpus with the generator's ground truth as the "experts".

Exercises the whole job without any model: e.g.
  python tools/pseudo_label.py --config=configs/pseudo_label/toyworld.py:tasks=seg+depth \
      --corpus='tar:/data/toyworld/{00000..00003}.tar' --output_dir=/data/toyworld_pl
Every field below can be set from the command line, e.g. --config.corpus.records_per_shard=500,
--config.experts.seg.label_max_side=256, --config.job.on_expert_error=skip,
--config.ray.num_workers=4.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from clipzoo_jax.config_args import parse_arg
from clipzoo_jax.pseudo_label import config as config_lib


def get_config(arg=None):
  arg = parse_arg(arg, tasks="seg+depth+normals+det", label_scale=1.0, batch_size=32,
                  records_per_shard=0, corpus="")
  config = ml_collections.ConfigDict()
  config.experts = {task: {"kind": "toyworld", "label_scale": arg.label_scale,
                           "label_max_side": placeholder(int)}
                    for task in arg.tasks.split("+")}
  config.corpus = config_lib.corpus_config(kind="tar", pattern=arg.corpus,
                                           records_per_shard=arg.records_per_shard)
  config.job = config_lib.job_config(batch_size=arg.batch_size, decode_threads=2)
  config.ray = config_lib.ray_config()  # --runner=ray: shard workers (no GPU: no model here)
  return config
