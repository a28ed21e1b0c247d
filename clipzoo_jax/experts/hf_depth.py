"""Depth expert: Hugging Face depth-estimation models (DPT, Depth Anything, ZoeDepth) via
`AutoModelForDepthEstimation` and the processor's `post_process_depth_estimation`."""

from __future__ import annotations

import inspect
from typing import Mapping, Sequence

import numpy as np

from clipzoo_jax.data import records
from clipzoo_jax.experts import base
from clipzoo_jax.experts.hf_model import HFExpert, HFModel

# Models whose output is metric depth; the rest (DPT, Depth Anything relative) give relative
# inverse depth (disparity) and are trained with a scale-and-shift-invariant loss.
_METRIC_MODEL_TYPES = ("zoedepth",)


def zoedepth_post_process(predicted_depth, source_sizes, target_sizes, remove_padding: bool):
  """ZoeDepth's `post_process_depth_estimation` without torchvision (transformers 5.23's PIL
  processor calls torchvision there). torchvision's tensor resize with bicubic interpolation and
  no antialias is `interpolate(mode="bicubic", align_corners=False)`, used here step for step:
  resize to the padded source size, crop the padding ZoeDepth added, resize to the target."""
  import torch.nn.functional as F
  results = []
  for depth, source, target in zip(predicted_depth, source_sizes, target_sizes):
    pad_h = int(np.sqrt(source[0] / 2) * 3) if remove_padding else 0
    pad_w = int(np.sqrt(source[1] / 2) * 3) if remove_padding else 0
    depth = F.interpolate(depth[None, None], size=[source[0] + 2 * pad_h, source[1] + 2 * pad_w],
                          mode="bicubic", align_corners=False)[0]
    depth = depth[:, pad_h:depth.shape[1] - pad_h, pad_w:depth.shape[2] - pad_w]
    depth = F.interpolate(depth[None], size=list(target), mode="bicubic", align_corners=False)[0]
    results.append({"predicted_depth": depth[0]})
  return results


def default_depth_kind(config) -> str:
  if config.model_type in _METRIC_MODEL_TYPES:
    return "metric"
  # Depth Anything V2 metric checkpoints say so in their config.
  return "metric" if getattr(config, "depth_estimation_type", None) == "metric" else "inverse"


@base.register("hf_depth")
class HFDepthExpert(HFExpert):
  """Depth at the label resolution, interpolated by the processor's own post-processing."""
  kind = "hf_depth"

  def __init__(self, task: str, source: str, device: str = "auto", dtype: str = "float32",
               depth_kind: str | None = None, label_scale: float = 1.0,
               label_max_side: int | None = None, processor_kwargs: Mapping | None = None):
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation
    self.task, self.source = task, source
    self.model = HFModel(source, AutoModelForDepthEstimation.from_pretrained,
                         AutoImageProcessor.from_pretrained, device, dtype, processor_kwargs)
    self.depth_kind = base.check_depth_kind(depth_kind or default_depth_kind(self.model.config),
                                            f"experts.{task}")
    self.resolution = base.resolution_from(label_scale, label_max_side)
    post = self.model.processor.post_process_depth_estimation
    # ZoeDepth pads its input and needs the source sizes to crop the padding away again.
    self._needs_source_sizes = "source_sizes" in inspect.signature(post).parameters

  def run(self, prepared: Sequence[dict], batch: base.Batch) -> list[records.Labels]:
    labels: list[records.Labels | None] = [None] * len(batch)
    for indices, outputs in self.model.forward(prepared):
      sizes = [self.label_size(batch.images[i]) for i in indices]
      extra = {}
      if self._needs_source_sizes:
        extra["source_sizes"] = [batch.images[i].shape[:2] for i in indices]
      results = self._post_process(outputs, sizes, extra)
      for i, size, result in zip(indices, sizes, results):
        # reshape: the post-processor squeezes away a label side of length 1
        depth = result["predicted_depth"].float().cpu().numpy().reshape(size)
        labels[i] = records.Labels(depth=depth)
    return labels

  def _post_process(self, outputs, sizes, extra):
    processor = self.model.processor
    if self._needs_source_sizes and self.model.config.model_type == "zoedepth":
      try:
        import torchvision  # noqa: F401  (the processor's own code path needs it)
      except ImportError:
        return zoedepth_post_process(outputs.predicted_depth, extra["source_sizes"], sizes,
                                     processor.do_pad)
    return processor.post_process_depth_estimation(outputs, target_sizes=sizes, **extra)

