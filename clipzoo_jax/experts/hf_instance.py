"""Detection experts: DETR-family detectors (RT-DETR, YOLOS, DETR with a transformers backbone) via
`post_process_object_detection`, and mask-classification models (Mask2Former, MaskFormer) via
`post_process_instance_segmentation`, whose instance masks become boxes."""

from __future__ import annotations

import abc

from typing import Mapping, Sequence

import numpy as np

from clipzoo_jax.data import records
from clipzoo_jax.experts import base
from clipzoo_jax.experts.hf_model import HFExpert, HFModel


def boxes_from_pixels(boxes_xyxy: np.ndarray, height: int, width: int) -> np.ndarray:
  """Pixel (xmin, ymin, xmax, ymax) boxes -> normalized (ymin, xmin, ymax, xmax), clipped to [0, 1]."""
  boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
  scale = np.array([height, width, height, width], np.float64)
  return np.clip(boxes[:, [1, 0, 3, 2]] / scale, 0.0, 1.0).astype(np.float32)


def boxes_from_segments(segmentation: np.ndarray,
                        segment_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Normalized (ymin, xmin, ymax, xmax) of each segment's pixels (`records.box_from_mask`), and
  which segments have pixels."""
  found = [records.box_from_mask(segmentation == segment_id) for segment_id in segment_ids]
  present = np.asarray([box is not None for box in found], bool)
  boxes = [box for box in found if box is not None]
  return np.asarray(boxes, np.float32).reshape(-1, 4), present


def _top_detections(boxes, classes, scores, max_detections: int | None) -> records.Labels:
  order = np.argsort(-scores, kind="stable")[:max_detections]
  return records.Labels(det_boxes=boxes[order].astype(np.float32),
                        det_classes=classes[order].astype(np.int64),
                        det_scores=scores[order].astype(np.float32))


class _ThresholdedExpert(HFExpert):
  """An HF model whose objects above `threshold` (at most `max_detections`) become boxes."""

  def __init__(self, task: str, source: str, device: str = "auto", dtype: str = "float32",
               threshold: float = 0.5, max_detections: int | None = 100,
               processor_kwargs: Mapping | None = None):
    from transformers import AutoImageProcessor
    self.task, self.source = task, source
    self.threshold, self.max_detections = float(threshold), max_detections
    self.model = HFModel(source, self.load_model, AutoImageProcessor.from_pretrained, device,
                         dtype, processor_kwargs)
    self.classes = self.model.class_names()

  @staticmethod
  @abc.abstractmethod
  def load_model(source: str, **kwargs):
    """The model's Auto class `from_pretrained`."""

  def manifest_entry(self) -> dict:
    entry = super().manifest_entry()
    entry["score_threshold"] = self.threshold
    entry["max_detections"] = self.max_detections
    return entry


@base.register("hf_detection")
class HFDetectionExpert(_ThresholdedExpert):
  """Boxes, classes and scores above `threshold` from `AutoModelForObjectDetection`."""
  kind = "hf_detection"

  @staticmethod
  def load_model(source: str, **kwargs):
    from transformers import AutoModelForObjectDetection
    return AutoModelForObjectDetection.from_pretrained(source, **kwargs)

  def run(self, prepared: Sequence[dict], batch: base.Batch) -> list[records.Labels]:
    labels: list[records.Labels | None] = [None] * len(batch)
    for indices, outputs in self.model.forward(prepared):
      sizes = [batch.images[i].shape[:2] for i in indices]
      results = self.model.processor.post_process_object_detection(
          outputs, threshold=self.threshold, target_sizes=sizes)
      for i, (height, width), result in zip(indices, sizes, results):
        labels[i] = _top_detections(boxes_from_pixels(result["boxes"].cpu().numpy(), height, width),
                                    result["labels"].cpu().numpy(), result["scores"].cpu().numpy(),
                                    self.max_detections)
    return labels


@base.register("hf_instance")
class HFInstanceExpert(_ThresholdedExpert):
  """Instances above `threshold` from a universal segmentation model; each mask's extent is a box."""
  kind = "hf_instance"

  def __init__(self, task: str, source: str, **kwargs):
    from transformers import AutoConfig
    model_type = AutoConfig.from_pretrained(source).model_type
    if model_type not in ("mask2former", "maskformer"):
      # OneFormer's instance post-processing in transformers 5.23 needs torchvision, which this
      # project does not install; its semantic mode works through hf_semantic.
      raise base.ExpertError(f"experts.{task}: hf_instance takes Mask2Former or MaskFormer "
                             f"models, found {model_type!r} at {source!r}")
    super().__init__(task, source, **kwargs)

  @staticmethod
  def load_model(source: str, **kwargs):
    from transformers import AutoModelForUniversalSegmentation
    return AutoModelForUniversalSegmentation.from_pretrained(source, **kwargs)

  def run(self, prepared: Sequence[dict], batch: base.Batch) -> list[records.Labels]:
    labels: list[records.Labels | None] = [None] * len(batch)
    for indices, outputs in self.model.forward(prepared):
      sizes = [batch.images[i].shape[:2] for i in indices]
      results = self.model.processor.post_process_instance_segmentation(
          outputs, threshold=self.threshold, target_sizes=sizes)
      for i, result in zip(indices, results):
        labels[i] = self._labels(result)
    return labels

  def _labels(self, result: dict) -> records.Labels:
    info = result["segments_info"]
    segmentation = result["segmentation"].cpu().numpy()
    boxes, present = boxes_from_segments(segmentation, [s["id"] for s in info])
    classes = np.asarray([s["label_id"] for s in info], np.int64).reshape(-1)[present]
    scores = np.asarray([s["score"] for s in info], np.float32).reshape(-1)[present]
    return _top_detections(boxes, classes, scores, self.max_detections)
