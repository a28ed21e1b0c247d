"""Semantic segmentation expert: Hugging Face SegFormer / UperNet / BEiT-style models and the
universal ones (Mask2Former, MaskFormer, OneFormer), through the processor's
`post_process_semantic_segmentation`."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from clipzoo_jax.data import records
from clipzoo_jax.experts import base
from clipzoo_jax.experts.hf_model import HFExpert, HFModel

# Mask-classification models: a query set of (class, mask) pairs combined into a class map.
UNIVERSAL_MODEL_TYPES = ("mask2former", "maskformer", "oneformer")


def load_universal_or_semantic(source: str):
  """The right Auto class for `source`: universal segmentation or per-pixel semantic."""
  from transformers import (AutoConfig, AutoModelForSemanticSegmentation,
                            AutoModelForUniversalSegmentation)
  model_type = AutoConfig.from_pretrained(source).model_type
  auto = (AutoModelForUniversalSegmentation if model_type in UNIVERSAL_MODEL_TYPES
          else AutoModelForSemanticSegmentation)
  return auto.from_pretrained(source)


def processor_loader(source: str):
  """OneFormer conditions on a task prompt and needs its text processor; others an image processor."""
  from transformers import AutoConfig, AutoImageProcessor, AutoProcessor
  if AutoConfig.from_pretrained(source).model_type == "oneformer":
    return AutoProcessor.from_pretrained, {"task_inputs": ["semantic"]}
  return AutoImageProcessor.from_pretrained, {}


@base.register("hf_semantic")
class HFSemanticExpert(HFExpert):
  """Class map at the label resolution: logits upsampled to it, then argmax (the processor's way)."""
  kind = "hf_semantic"

  def __init__(self, task: str, source: str, device: str = "auto", dtype: str = "float32",
               label_scale: float = 1.0, label_max_side: int | None = None,
               processor_kwargs: Mapping | None = None):
    self.task, self.source = task, source
    load_processor, call_kwargs = processor_loader(source)
    self.model = HFModel(source, load_universal_or_semantic, load_processor, device, dtype,
                         processor_kwargs, call_kwargs)
    self.classes = self.model.class_names()
    self.resolution = base.resolution_from(label_scale, label_max_side)

  def run(self, prepared: Sequence[dict], batch: base.Batch) -> list[records.Labels]:
    labels: list[records.Labels | None] = [None] * len(batch)
    for indices, outputs in self.model.forward(prepared):
      sizes = [self.label_size(batch.images[i]) for i in indices]
      maps = self.model.processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
      for i, class_map in zip(indices, maps):
        labels[i] = records.Labels(seg=class_map.cpu().numpy().astype(np.int32))
    return labels

