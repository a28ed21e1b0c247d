"""Pseudo-label a toy-world corpus with the demo zoo (`tools/build_demo_zoo.py --out=DIR`): trained
SegFormer, Depth Anything and RT-DETR folders, loaded as any downloaded expert is, e.g.
  python tools/pseudo_label.py \
      --config=configs/pseudo_label/demo_zoo.py:zoo_dir=workdirs/zoo,tasks=seg+depth+normals+det \
      --corpus='tar:/data/toy/{00000..00007}.tar' --output_dir=/data/toy_pl
Normals come from this job's depth (the geometric expert at the toy cameras' mean field of view).
Every field can be set from the command line, e.g. --config.experts.det.threshold=0.5,
--config.job.batch_size=64, --config.experts.seg.label_max_side=32.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from clipzoo_jax.config_args import parse_arg
from clipzoo_jax.experts import base
from clipzoo_jax.miniature import zoo
from clipzoo_jax.pseudo_label import config as config_lib

# Options whose default (None: the expert kind's own) must stay settable from the command line.
_TYPED_NONE = {"label_max_side": int, "depth_kind": str}


def _settable(expert: dict) -> dict:
  out = {}
  for key, value in expert.items():
    if isinstance(value, dict):
      value = _settable(value)
    elif value is None:
      value = placeholder(_TYPED_NONE[key])
    out[key] = value
  return out


def get_config(arg=None):
  arg = parse_arg(arg, zoo_dir="", tasks="seg+depth+normals+det", device="cpu", dtype="float32",
                  det_threshold=zoo.DET_THRESHOLD, fov_degrees=zoo.FOV_DEGREES, label_scale=1.0,
                  batch_size=32, records_per_shard=0, corpus="")
  if not arg.zoo_dir:
    raise base.ExpertError("demo_zoo config: set zoo_dir, e.g. "
                           "--config=configs/pseudo_label/demo_zoo.py:zoo_dir=workdirs/zoo")
  experts = zoo.expert_configs(arg.zoo_dir, arg.tasks.split("+"), device=arg.device,
                               dtype=arg.dtype, det_threshold=arg.det_threshold,
                               fov_degrees=arg.fov_degrees, label_scale=arg.label_scale)
  config = ml_collections.ConfigDict()
  config.experts = {task: _settable(expert) for task, expert in experts.items()}
  config.corpus = config_lib.corpus_config(kind="tar", pattern=arg.corpus,
                                           records_per_shard=arg.records_per_shard)
  config.job = config_lib.job_config(batch_size=arg.batch_size, decode_threads=2)
  config.ray = config_lib.ray_config()  # --runner=ray: CPU shard workers, each with every expert
  return config
