"""Ready-made `config.evals` for the experiment configs: the offline toy-world set (zero-shot,
retrieval, seg and depth probes, seconds each on a CPU) and the paper's set on TFDS datasets from
a prepared `data_dir` (ImageNet zero-shot, ADE20K seg and NYU-v2 depth probes, COCO detection
probe). Plain data, so configs stay importable without JAX."""

from __future__ import annotations

import ml_collections


def toyworld_evals(every: int, image_size: int = 64, batch_size: int = 64,
                   probe_steps: int = 100, probe_tasks=("seg", "depth"),
                   cache_features: bool = False) -> ml_collections.ConfigDict:
  """Zero-shot on the largest object's colour and shape (30 classes) and on its colour alone (10,
  prompts averaged over shapes), retrieval over 5 captions per image, and a linear probe per
  task of `probe_tasks` (`<task>_probe`) on held-out toy-world scenes (`cache_features`: the
  probes' training features computed once, see evals/dense_probe.py)."""
  toy = lambda kind, seed, count, **kw: dict(source="toyworld", kind=kind, seed=seed,
                                              num_examples=count, size=image_size, **kw)
  probe = lambda task: dict(
      type="dense_probe", task=task, head="linear", every=every, batch_size=batch_size,
      steps=probe_steps, learning_rate=3e-3, cache_features=cache_features,
      train_dataset=toy("dense", 1003, 256, split="probe_train"),
      dataset=toy("dense", 1004, 128, split="val"))
  evals = ml_collections.ConfigDict(dict(
      zeroshot=dict(type="zeroshot", every=every, batch_size=batch_size, templates="toyworld",
                    dataset=toy("classification", 1001, 256)),
      zeroshot_colour=dict(type="zeroshot", every=every, batch_size=batch_size,
                           templates="toyworld_colour",
                           dataset=toy("classification", 1001, 256, label="colour")),
      retrieval=dict(type="retrieval", every=every, batch_size=batch_size,
                     dataset=toy("retrieval", 1002, 128, captions_per_image=5)),
  ))
  for task in probe_tasks:
    evals[f"{task}_probe"] = probe(task)
  return evals


def tfds_evals(data_dir: str, every: int, batch_size: int = 256,
               probe_steps: int = 20000) -> ml_collections.ConfigDict:
  """The paper's measurements on TFDS datasets prepared under `data_dir`."""
  tfds = lambda name, split: dict(source="tfds", name=name, split=split, data_dir=data_dir)
  probe = lambda task, name, head, **kw: dict(
      type="dense_probe", task=task, head=head, every=every, batch_size=batch_size,
      steps=probe_steps, learning_rate=1e-3, train_dataset=tfds(name, "train"),
      dataset=tfds(name, kw.pop("split", "validation")), **kw)
  return ml_collections.ConfigDict(dict(
      imagenet=dict(type="zeroshot", every=every, batch_size=batch_size, classes="imagenet",
                    templates="openai_imagenet", dataset=tfds("imagenet2012", "validation")),
      ade20k_linear=probe("seg", "scene_parse150", "linear"),
      ade20k_light=probe("seg", "scene_parse150", "light"),
      nyu_depth=probe("depth", "nyu_depth_v2", "light"),
      coco_det=probe("det", "coco/2017", "light"),
  ))
