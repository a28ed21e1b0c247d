"""Pseudo-label a real corpus with production model-zoo experts (PAPER.md's table).

Choose one expert per task by short name; an empty name leaves the task out. Models load from
hub ids (the Hugging Face cache) or, with `models_dir`, from `<models_dir>/<hub id>` folders:
  python tools/pseudo_label.py \
      --config=configs/pseudo_label/zoo.py:depth=dpt-large,seg=segformer-b5,det=rtdetr-r50,dtype=bfloat16 \
      --corpus='tar:/data/cc3m/{00000..00331}.tar' --output_dir=/data/cc3m_pl
Normals: `from-depth` (geometric, from this job's depth expert) or `onnx` with `normals_onnx=PATH`
(set its preprocessing with --config.experts.normals.input_size='(384,512)' etc.).
Every field of the config can be set from the command line, e.g.
--config.experts.seg.label_max_side=1024 (caps label memory on huge images),
--config.corpus.image_column=filepath --config.corpus.caption_column=title (open_clip TSVs),
--config.job.on_expert_error=skip, --config.ray.num_gpus=0.5.
"""

import os

import ml_collections
from ml_collections.config_dict import placeholder

from clipzoo_jax.config_args import parse_arg
from clipzoo_jax.experts import base, onnx_normals
from clipzoo_jax.pseudo_label import config as config_lib

# short name -> (expert kind, hub id)
DEPTH = {
    "dpt-large": ("hf_depth", "Intel/dpt-large"),
    "dpt-hybrid": ("hf_depth", "Intel/dpt-hybrid-midas"),
    "depth-anything-v2-large": ("hf_depth", "depth-anything/Depth-Anything-V2-Large-hf"),
    "zoedepth-nyu-kitti": ("hf_depth", "Intel/zoedepth-nyu-kitti"),
}
SEG = {
    "segformer-b5": ("hf_semantic", "nvidia/segformer-b5-finetuned-ade-640-640"),
    "upernet-convnext-large": ("hf_semantic", "openmmlab/upernet-convnext-large"),
    "mask2former-ade": ("hf_semantic", "facebook/mask2former-swin-large-ade-semantic"),
    "oneformer-ade": ("hf_semantic", "shi-labs/oneformer_ade20k_swin_large"),
}
DET = {
    "mask2former-coco": ("hf_instance", "facebook/mask2former-swin-large-coco-instance"),
    "rtdetr-r50": ("hf_detection", "PekingU/rtdetr_r50vd"),
    "yolos-base": ("hf_detection", "hustvl/yolos-base"),
}


def _pick(table, task, name, arg):
  if name not in table:
    raise base.ExpertError(f"zoo config arg {task}={name!r}: expected one of {sorted(table)} "
                           "or empty")
  kind, hub_id = table[name]
  source = os.path.join(arg.models_dir, hub_id) if arg.models_dir else hub_id
  expert = {"kind": kind, "source": source, "device": arg.device, "dtype": arg.dtype}
  if task in ("seg", "depth"):
    expert.update(label_scale=arg.label_scale, label_max_side=placeholder(int))
  if task == "depth":
    expert.update(depth_kind=placeholder(str))  # default: from the model's config
  if task == "det":
    expert.update(threshold=arg.det_threshold, max_detections=100)
  return expert


def _normals(arg, experts):
  if arg.normals == "from-depth":
    expert = {"kind": "depth_normals", "fov_degrees": arg.fov_degrees,
              "label_scale": arg.label_scale, "label_max_side": placeholder(int)}
    if "depth" in experts:
      expert["from_task"] = "depth"  # reuse this job's depth: no second forward pass
    else:
      expert["depth"] = _pick(DEPTH, "depth", "dpt-large", arg)
    return expert
  if arg.normals == "onnx":
    return {"kind": "onnx_normals", "source": arg.normals_onnx, "device": arg.device,
            "input_size": placeholder(tuple), "size_multiple": 32,
            "mean": onnx_normals.IMAGENET_MEAN, "std": onnx_normals.IMAGENET_STD,
            "output_index": 0, "output_layout": "NCHW", "axis_signs": (1.0, 1.0, 1.0),
            "label_scale": arg.label_scale, "label_max_side": placeholder(int)}
  raise base.ExpertError(f"zoo config arg normals={arg.normals!r}: expected from-depth, onnx or empty")


def get_config(arg=None):
  arg = parse_arg(arg, depth="dpt-large", seg="segformer-b5", det="rtdetr-r50",
                  normals="from-depth", normals_onnx="", fov_degrees=60.0, models_dir="",
                  device="auto", dtype="float32", det_threshold=0.5, label_scale=1.0,
                  batch_size=16, records_per_shard=0)
  experts = {}
  for task, table in (("depth", DEPTH), ("seg", SEG), ("det", DET)):
    if getattr(arg, task):
      experts[task] = _pick(table, task, getattr(arg, task), arg)
  if arg.normals:
    experts["normals"] = _normals(arg, experts)
  config = ml_collections.ConfigDict()
  config.experts = experts
  config.corpus = config_lib.corpus_config(records_per_shard=arg.records_per_shard)
  config.job = config_lib.job_config(batch_size=arg.batch_size, decode_threads=4,
                                     progress_every_s=30.0)
  # --runner=ray: one shard worker per GPU holding every expert (num_gpus=0.5 puts two on a GPU),
  # with CPUs for its decode threads; on a CPU-only cluster set --config.ray.num_gpus=0.
  config.ray = config_lib.ray_config(num_gpus=0.0 if arg.device == "cpu" else 1.0,
                                     num_cpus=config.job.decode_threads + 2)
  return config
