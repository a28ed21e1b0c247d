"""Evaluation metrics as pure NumPy accumulators, so every number in a report can be checked
against an independent implementation without JAX, a mesh or a dataset.

Evaluators fetch predictions to the host and feed them here batch by batch: each metric keeps a
small running state (`update`), merges the state of another host or shard (`add`) and turns it into
numbers at the end (`result`). Nothing here keeps a dataset's worth of pixels.

Conventions, in one place so that every report agrees:
- Padding: each `update` takes an optional `mask` whose shape is a prefix of the data's shape
  (normally `(batch,)`, one flag per example). False entries are dropped, so a padded final batch
  counts every real example exactly once. Callers may slice instead; both give the same numbers.
- Units: accuracies, IoUs, recalls, AP and depth deltas are fractions in [0, 1]; normals errors are
  degrees and `within_*` are percent of pixels, as the NYU normals literature reports them.
- Nothing to average gives NaN, never 0. A non-finite prediction where the target is valid makes
  every depth / normals result NaN: a diverged model must not look merely mediocre.
- Ties (top-k, retrieval) count against the correct answer, so a constant model scores 0; NaN
  scores rank below everything.
- Depth: averaged per pixel over the whole dataset (`average="pixel"`, default) or as the mean of
  per-image metrics (`average="image"`, the BTS / AdaBins NYU convention).
- Normals median: from a histogram of `median_bin_degrees` (0.01) wide bins; it is within half a
  bin (0.005 degrees) of the exact median of all valid pixels, in 18,000 counters.
- Detection AP: pycocotools `COCOeval` rules for area "all": at most `max_detections` (100)
  detections per image and class, greedy matching in score order, 101-point interpolated
  precision; crowd ground truth is matched by intersection over the detection's area and such
  detections are neither true nor false positives, while an unmatched crowd box is no miss.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

NAN = float("nan")
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
MIN_VECTOR_NORM = 1e-6  # normals shorter than this have no direction


def _example_mask(mask, shape) -> np.ndarray:
  """A boolean array of `shape` from `mask`, whose shape must be a prefix of `shape`."""
  shape = tuple(shape)
  if mask is None:
    return np.ones(shape, bool)
  mask = np.asarray(mask, bool)
  if mask.shape != shape[:mask.ndim]:
    raise ValueError(f"mask: expected a prefix of the data shape {shape} (usually (batch,)), "
                     f"found {mask.shape}")
  return np.broadcast_to(mask.reshape(mask.shape + (1,) * (len(shape) - mask.ndim)), shape)


def _check_shapes(where: str, **arrays) -> None:
  shapes = {name: np.shape(value) for name, value in arrays.items()}
  if len(set(shapes.values())) > 1:
    found = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
    raise ValueError(f"{where}: expected equal shapes, found {found}")


def _check_integers(where: str, **arrays) -> None:
  for name, value in arrays.items():
    if value.size and not np.issubdtype(value.dtype, np.integer):
      raise ValueError(f"{where}: expected integer {name}, found dtype {value.dtype}")


def _nanmean(values) -> float:
  values = np.asarray(values, np.float64)
  finite = values[~np.isnan(values)]
  return float(finite.mean()) if finite.size else NAN


def _ratio(numerator, denominator) -> float:
  return float(numerator) / float(denominator) if denominator > 0 else NAN


# ---------------------------------------------------------------------------------------------
# Semantic segmentation


class ConfusionMatrix:
  """Segmentation counts `counts[target, pred]` over the labelled pixels of a dataset.

  A pixel whose target is `ignore_index` or outside [0, num_classes) (e.g. 255) is not counted.
  IoU of a class is TP / (TP + FP + FN); `miou` averages it over the classes present in the target
  or the prediction, a class absent from both being NaN in `per_class_iou` and left out.
  `mean_class_accuracy` averages recall over the classes present in the target.
  """

  def __init__(self, num_classes: int, ignore_index: int = -1):
    if num_classes < 1:
      raise ValueError(f"num_classes: expected >= 1, found {num_classes}")
    self.num_classes = int(num_classes)
    self.ignore_index = ignore_index
    self.counts = np.zeros((self.num_classes,) * 2, np.int64)

  def update(self, pred, target, mask=None) -> None:
    pred, target = np.asarray(pred), np.asarray(target)
    _check_shapes("ConfusionMatrix.update", pred=pred, target=target)
    _check_integers("ConfusionMatrix.update", pred=pred, target=target)
    n = self.num_classes
    keep = (_example_mask(mask, target.shape) & (target != self.ignore_index) & (target >= 0)
            & (target < n))
    pred, target = pred[keep].astype(np.int64), target[keep].astype(np.int64)
    outside = (pred < 0) | (pred >= n)
    if outside.any():
      raise ValueError(f"ConfusionMatrix.update: expected predicted classes in [0, {n}), "
                       f"found {pred[outside][0]}")
    self.counts += np.bincount(target * n + pred, minlength=n * n).reshape(n, n)

  def add(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
    if other.num_classes != self.num_classes:
      raise ValueError(f"ConfusionMatrix.add: expected {self.num_classes} classes, "
                       f"found {other.num_classes}")
    self.counts += other.counts
    return self

  def result(self) -> dict:
    counts = self.counts.astype(np.float64)
    hits, in_target, in_pred = np.diag(counts), counts.sum(1), counts.sum(0)
    union = in_target + in_pred - hits
    iou = np.full(self.num_classes, NAN)
    np.divide(hits, union, out=iou, where=union > 0)
    recall = np.full(self.num_classes, NAN)
    np.divide(hits, in_target, out=recall, where=in_target > 0)
    return {"miou": _nanmean(iou), "pixel_accuracy": _ratio(hits.sum(), counts.sum()),
            "mean_class_accuracy": _nanmean(recall), "per_class_iou": iou.tolist(),
            "per_class_accuracy": recall.tolist()}


# ---------------------------------------------------------------------------------------------
# Depth

DEPTH_KEYS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3")
_ROOT_KEYS = np.array([key in ("rmse", "rmse_log") for key in DEPTH_KEYS])


def _depth_sums(pred: np.ndarray, target: np.ndarray, valid: np.ndarray):
  """Per image (leading axis): sums over valid pixels of each DEPTH_KEYS term (squared errors for
  the rmse keys, hit counts for the deltas), shape (B, 8), and the valid pixel counts (B,)."""
  batch = pred.shape[0]
  valid = valid.reshape(batch, -1)
  p = np.where(valid, pred.reshape(batch, -1), 1.0)
  g = np.where(valid, target.reshape(batch, -1), 1.0)
  log_error = np.log(p) - np.log(g)
  ratio = np.maximum(p / g, g / p)
  terms = (np.abs(p - g) / g, (p - g) ** 2 / g, (p - g) ** 2, log_error ** 2,
           np.abs(log_error) / np.log(10.0), ratio < 1.25, ratio < 1.25 ** 2, ratio < 1.25 ** 3)
  sums = np.stack([np.where(valid, term, 0.0).sum(1) for term in terms], axis=1)
  return sums, valid.sum(1)


class DepthMetrics:
  """Depth errors: abs_rel, sq_rel, rmse, rmse_log, log10 and delta1..3 (max(p/g, g/p) < 1.25^k).

  `average="pixel"` (default) pools all valid pixels of the dataset (rmse is the root of the
  pooled mean squared error); `average="image"` computes every metric per image (the leading axis)
  and averages over images that have a valid pixel. A target that is non-finite, <= 0, or above
  `max_depth` is invalid, as is any pixel where `valid` is False. Predictions are clipped to
  [min_depth, max_depth] first, so ratios and logs stay finite.
  """

  def __init__(self, average: str = "pixel", min_depth: float = 1e-3,
               max_depth: float | None = None):
    if average not in ("pixel", "image"):
      raise ValueError(f"average: expected 'pixel' or 'image', found {average!r}")
    self.average, self.min_depth, self.max_depth = average, min_depth, max_depth
    self.total = np.zeros(len(DEPTH_KEYS))
    self.count = 0  # pixels (average="pixel") or images (average="image")
    self.nonfinite = 0

  def update(self, pred, target, valid=None, mask=None) -> None:
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    _check_shapes("DepthMetrics.update", pred=pred, target=target)
    if pred.ndim < 1:
      raise ValueError(f"DepthMetrics.update: expected (batch, ...) arrays, found {pred.shape}")
    with np.errstate(invalid="ignore"):
      ok = np.isfinite(target) & (target > 0) & _example_mask(mask, target.shape)
      if self.max_depth is not None:
        ok &= target <= self.max_depth
    if valid is not None:
      _check_shapes("DepthMetrics.update", target=target, valid=valid)
      ok &= np.asarray(valid, bool)
    self.nonfinite += int(np.count_nonzero(ok & ~np.isfinite(pred)))
    pred = np.clip(np.nan_to_num(pred, nan=1.0), self.min_depth,
                   np.inf if self.max_depth is None else self.max_depth)
    sums, counts = _depth_sums(pred, target, ok)
    if self.average == "pixel":
      self.total += sums.sum(0)
      self.count += int(counts.sum())
    else:
      per_image = sums[counts > 0] / counts[counts > 0, None]
      per_image[:, _ROOT_KEYS] = np.sqrt(per_image[:, _ROOT_KEYS])
      self.total += per_image.sum(0)
      self.count += len(per_image)

  def add(self, other: "DepthMetrics") -> "DepthMetrics":
    if other.average != self.average:
      raise ValueError(f"DepthMetrics.add: expected average={self.average!r}, "
                       f"found {other.average!r}")
    self.total += other.total
    self.count += other.count
    self.nonfinite += other.nonfinite
    return self

  def result(self) -> dict:
    if self.count == 0 or self.nonfinite:
      return dict.fromkeys(DEPTH_KEYS, NAN)
    means = self.total / self.count
    if self.average == "pixel":
      means[_ROOT_KEYS] = np.sqrt(means[_ROOT_KEYS])
    return {key: float(value) for key, value in zip(DEPTH_KEYS, means)}


def _image_rows(pred, target, valid, where: str):
  """(B, pixels) float64 views of per-image arrays (leading axis = image) and the valid mask."""
  pred, target = np.asarray(pred), np.asarray(target)
  _check_shapes(where, pred=pred, target=target)
  if pred.ndim < 3:
    raise ValueError(f"{where}: expected (batch, height, width[, 1]) arrays with the image on "
                     f"the leading axis, found {pred.shape}; add [None] for one image")
  batch = pred.shape[0]
  p, g = pred.reshape(batch, -1).astype(np.float64), target.reshape(batch, -1).astype(np.float64)
  if valid is None:
    with np.errstate(invalid="ignore"):
      valid = np.isfinite(g) & (g > 0)
  else:
    _check_shapes(where, target=target, valid=valid)
    valid = np.asarray(valid, bool).reshape(batch, -1)
  return p, g, valid & np.isfinite(p)


def align_scale_shift(pred, target, valid=None) -> np.ndarray:
  """`s * pred + t` with, per image, the least-squares s, t over valid pixels.

  For probes of relative (affine-invariant) depth or disparity: pass both in the space the probe
  predicts. `valid` defaults to finite target > 0. An image with no valid pixel is returned
  unchanged; one with a constant prediction gets s = 0 and t = mean target.
  """
  p, g, valid = _image_rows(pred, target, valid, "align_scale_shift")
  weight = valid.astype(np.float64)
  count = weight.sum(1)
  mean_p = (weight * p).sum(1) / np.maximum(count, 1)
  mean_g = (weight * g).sum(1) / np.maximum(count, 1)
  centred_p = np.where(valid, p - mean_p[:, None], 0.0)
  variance = (centred_p ** 2).sum(1)
  covariance = (centred_p * np.where(valid, g - mean_g[:, None], 0.0)).sum(1)
  tiny = np.finfo(np.float64).eps * (weight * p ** 2).sum(1)
  scale = np.where(variance > tiny, covariance / np.where(variance > tiny, variance, 1.0), 0.0)
  shift = mean_g - scale * mean_p
  scale, shift = np.where(count > 0, scale, 1.0), np.where(count > 0, shift, 0.0)
  aligned = scale[:, None] * p + shift[:, None]
  return aligned.reshape(np.shape(pred)).astype(_float_dtype(pred))


def align_median_scale(pred, target, valid=None) -> np.ndarray:
  """`pred * median(target) / median(pred)` per image over valid pixels (the scale-only alignment
  of monocular depth evaluations). Images without a valid pixel or with a median prediction <= 0
  are returned unchanged."""
  p, g, valid = _image_rows(pred, target, valid, "align_median_scale")
  scale = np.ones(len(p))
  for image in range(len(p)):
    if valid[image].any():
      median_pred = np.median(p[image, valid[image]])
      if median_pred > 0:
        scale[image] = np.median(g[image, valid[image]]) / median_pred
  return (scale[:, None] * p).reshape(np.shape(pred)).astype(_float_dtype(pred))


def _float_dtype(array):
  dtype = np.asarray(array).dtype
  return dtype if np.issubdtype(dtype, np.floating) else np.float64


# ---------------------------------------------------------------------------------------------
# Surface normals


def angular_error_degrees(pred, target) -> np.ndarray:
  """Angle between (..., 3) vectors in degrees, as atan2(|a x b|, a . b) of the unit vectors:
  exact to rounding at 0 and 180 degrees, where arccos of a rounded dot product loses half the
  digits. A vector shorter than MIN_VECTOR_NORM has no direction: its error is 90 degrees."""
  a, b = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  _check_shapes("angular_error_degrees", pred=a, target=b)
  if a.shape[-1:] != (3,):
    raise ValueError(f"angular_error_degrees: expected (..., 3) vectors, found {a.shape}")
  norm_a, norm_b = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
  directed = (norm_a >= MIN_VECTOR_NORM) & (norm_b >= MIN_VECTOR_NORM)
  a = a / np.where(directed, norm_a, 1.0)[..., None]
  b = b / np.where(directed, norm_b, 1.0)[..., None]
  angle = np.degrees(np.arctan2(np.linalg.norm(np.cross(a, b), axis=-1), (a * b).sum(-1)))
  return np.where(directed, angle, 90.0)


NORMALS_THRESHOLDS = (("within_11_25", 11.25), ("within_22_5", 22.5), ("within_30", 30.0))


class NormalsMetrics:
  """Angular error of predicted normals: mean, median and rmse in degrees, and the percent of
  pixels with error below 11.25, 22.5 and 30 degrees, over the valid pixels of the dataset.

  A pixel is valid where `valid` (shape `pred.shape[:-1]`) is True and the target is finite with
  norm >= MIN_VECTOR_NORM. Predictions need not be unit length. Mean, rmse and the within-counts
  are exact; the median comes from a histogram with `median_bin_degrees` wide bins and is within
  half a bin of the exact median, so memory stays at 180 / median_bin_degrees counters.
  """

  def __init__(self, median_bin_degrees: float = 0.01):
    if not 0 < median_bin_degrees <= 180:
      raise ValueError(f"median_bin_degrees: expected in (0, 180], found {median_bin_degrees}")
    self.bin_degrees = float(median_bin_degrees)
    self.histogram = np.zeros(int(np.ceil(180.0 / self.bin_degrees)), np.int64)
    self.sum, self.sum_squares = 0.0, 0.0
    self.within = np.zeros(len(NORMALS_THRESHOLDS), np.int64)
    self.nonfinite = 0

  def update(self, pred, target, valid=None, mask=None) -> None:
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    _check_shapes("NormalsMetrics.update", pred=pred, target=target)
    if pred.shape[-1:] != (3,):
      raise ValueError(f"NormalsMetrics.update: expected (..., 3) vectors, found {pred.shape}")
    ok = np.all(np.isfinite(target), -1) & _example_mask(mask, target.shape[:-1])
    ok &= np.linalg.norm(np.nan_to_num(target), axis=-1) >= MIN_VECTOR_NORM
    if valid is not None:
      if np.shape(valid) != target.shape[:-1]:
        raise ValueError(f"NormalsMetrics.update: expected valid of shape {target.shape[:-1]}, "
                         f"found {np.shape(valid)}")
      ok &= np.asarray(valid, bool)
    finite = np.all(np.isfinite(pred), -1)
    self.nonfinite += int(np.count_nonzero(ok & ~finite))
    angle = angular_error_degrees(pred[ok & finite], target[ok & finite])
    bins = np.minimum((angle / self.bin_degrees).astype(np.int64), len(self.histogram) - 1)
    self.histogram += np.bincount(bins, minlength=len(self.histogram))
    self.sum += float(angle.sum())
    self.sum_squares += float((angle ** 2).sum())
    self.within += [np.count_nonzero(angle < limit) for _, limit in NORMALS_THRESHOLDS]

  def add(self, other: "NormalsMetrics") -> "NormalsMetrics":
    if other.bin_degrees != self.bin_degrees:
      raise ValueError(f"NormalsMetrics.add: expected median_bin_degrees={self.bin_degrees}, "
                       f"found {other.bin_degrees}")
    self.histogram += other.histogram
    self.sum += other.sum
    self.sum_squares += other.sum_squares
    self.within += other.within
    self.nonfinite += other.nonfinite
    return self

  def result(self) -> dict:
    count = int(self.histogram.sum())
    keys = ("mean", "median", "rmse") + tuple(name for name, _ in NORMALS_THRESHOLDS)
    if count == 0 or self.nonfinite:
      return dict.fromkeys(keys, NAN)
    values = (self.sum / count, histogram_median(self.histogram, self.bin_degrees),
              np.sqrt(self.sum_squares / count), *(100.0 * self.within / count))
    return {key: float(value) for key, value in zip(keys, values)}


def histogram_median(histogram, bin_width: float) -> float:
  """The median of values counted in bins [i * w, (i + 1) * w): the mean of the centres of the bins
  holding the two middle values (one for an odd count), hence within w / 2 of the exact median."""
  histogram = np.asarray(histogram)
  count = int(histogram.sum())
  if count == 0:
    return NAN
  cumulative = np.cumsum(histogram)
  low = np.searchsorted(cumulative, (count - 1) // 2 + 1)  # bin of the value of rank (n-1)//2
  high = np.searchsorted(cumulative, count // 2 + 1)
  return float((low + high + 1) * bin_width / 2)


# ---------------------------------------------------------------------------------------------
# Detection


def box_iou(a, b) -> np.ndarray:
  """IoU matrix (N, M) of boxes (N, 4) and (M, 4) given as normalized ymin, xmin, ymax, xmax.
  Inverted boxes have zero area; two zero-area boxes have IoU 0."""
  intersection, area_a, area_b = _box_overlaps(a, b, "box_iou")
  union = area_a[:, None] + area_b[None, :] - intersection
  return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def _box_overlaps(a, b, where: str):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  for name, boxes in (("a", a), ("b", b)):
    if boxes.ndim != 2 or boxes.shape[1] != 4:
      raise ValueError(f"{where}: expected {name} of shape (n, 4) (ymin, xmin, ymax, xmax), "
                       f"found {boxes.shape}")
  top_left = np.maximum(a[:, None, :2], b[None, :, :2])
  bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
  intersection = np.prod(np.clip(bottom_right - top_left, 0, None), axis=-1)
  area = lambda boxes: np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=-1)
  return intersection, area(a), area(b)


def _crowd_iou(boxes, gt_boxes, gt_crowd) -> np.ndarray:
  """COCO's overlap: IoU with regular ground truth, intersection over the detection's area with
  crowd ground truth (a detection inside a crowd region overlaps it fully)."""
  intersection, area, gt_area = _box_overlaps(boxes, gt_boxes, "DetectionAP.update")
  union = np.where(gt_crowd[None, :], area[:, None],
                   area[:, None] + gt_area[None, :] - intersection)
  return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def _last_argmax(values: np.ndarray) -> np.ndarray:
  """Index of the last maximum along axis 1 (COCO keeps the last of equally good matches)."""
  return values.shape[1] - 1 - np.argmax(values[:, ::-1], axis=1)


def match_detections(boxes, gt_boxes, gt_crowd, thresholds):
  """COCO greedy matching for one image and class, at every IoU threshold.

  `boxes` must be sorted by descending score and `gt_boxes` regular before crowd. Each detection
  takes the best still-free regular ground truth with IoU >= threshold, else the best crowd one
  (which stays free). Returns (matched, on_crowd), bool arrays (thresholds, detections).
  """
  thresholds = np.minimum(np.asarray(thresholds, np.float64), 1 - 1e-10)[:, None]
  matched = np.zeros((len(thresholds), len(boxes)), bool)
  on_crowd = np.zeros_like(matched)
  if len(boxes) == 0 or len(gt_boxes) == 0:
    return matched, on_crowd
  overlap = _crowd_iou(boxes, gt_boxes, gt_crowd)
  taken = np.zeros((len(thresholds), len(gt_boxes)), bool)
  for index, row in enumerate(overlap):
    candidate = (row[None, :] >= thresholds) & (gt_crowd[None, :] | ~taken)
    regular, crowd = candidate & ~gt_crowd, candidate & gt_crowd
    best = np.where(regular.any(1), _last_argmax(np.where(regular, row, -1.0)),
                    _last_argmax(np.where(crowd, row, -1.0)))
    hit = candidate.any(1)
    matched[:, index], on_crowd[:, index] = hit, hit & gt_crowd[best]
    claims = np.nonzero(hit & ~gt_crowd[best])[0]
    taken[claims, best[claims]] = True
  return matched, on_crowd


def interpolated_ap(scores, matched, on_crowd, num_gt, recall_thresholds=COCO_RECALL_THRESHOLDS):
  """COCO AP per IoU threshold of one class: detections of all images sorted by score (stable),
  precision made non-increasing from the right, read at each recall threshold (0 past the
  highest recall reached) and averaged. `matched`, `on_crowd`: (thresholds, detections)."""
  order = np.argsort(-np.asarray(scores), kind="mergesort")
  counted = ~on_crowd[:, order]
  true_pos = np.cumsum(matched[:, order] & counted, axis=1, dtype=np.float64)
  false_pos = np.cumsum(~matched[:, order] & counted, axis=1, dtype=np.float64)
  ap = np.zeros(len(matched))
  if not len(order):
    return ap
  recall = true_pos / num_gt
  # pycocotools adds eps to the denominator instead: 1e-16 apart, and 1.0 stays 1.0 here
  precision = true_pos / np.maximum(true_pos + false_pos, 1.0)
  precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
  for t in range(len(matched)):
    index = np.searchsorted(recall[t], recall_thresholds, side="left")
    reached = index < len(order)
    ap[t] = np.where(reached, precision[t, np.minimum(index, len(order) - 1)], 0.0).mean()
  return ap


class DetectionAP:
  """COCO box AP over a dataset, fed one image at a time (or a padded batch, `update_batch`).

  `result()`: `ap` is the mean over IoU thresholds and over the classes with at least one regular
  (non-crowd) ground-truth box; `ap50` / `ap75` the same at IoU 0.5 / 0.75 (present when those are
  among the thresholds); `per_class_ap` is NaN for classes without ground truth. Predictions of a
  class without ground truth change nothing; images without boxes of either kind are fine.
  """

  def __init__(self, num_classes: int, iou_thresholds=COCO_IOU_THRESHOLDS,
               max_detections: int = 100):
    if num_classes < 1:
      raise ValueError(f"num_classes: expected >= 1, found {num_classes}")
    self.num_classes, self.max_detections = int(num_classes), int(max_detections)
    self.thresholds = np.asarray(iou_thresholds, np.float64).reshape(-1)
    self.num_gt = np.zeros(self.num_classes, np.int64)
    self.scores = [[] for _ in range(self.num_classes)]
    self.matched = [[] for _ in range(self.num_classes)]
    self.on_crowd = [[] for _ in range(self.num_classes)]

  def update(self, pred_boxes, pred_scores, pred_classes, gt_boxes, gt_classes,
             gt_crowd=None) -> None:
    """One image: predictions (N, 4), (N,), (N,) and ground truth (M, 4), (M,), crowd (M,)."""
    pred = _detection_arrays(pred_boxes, pred_scores, pred_classes, self.num_classes, "pred")
    if gt_crowd is None:
      gt_crowd = np.zeros(np.size(gt_classes), bool)
    crowd = np.asarray(gt_crowd, bool).reshape(-1)
    gt = _detection_arrays(gt_boxes, crowd, gt_classes, self.num_classes, "gt")
    for cls in np.union1d(pred[2], gt[2]):
      mine, theirs = pred[2] == cls, gt[2] == cls
      order = np.argsort(-pred[1][mine], kind="mergesort")[:self.max_detections]
      gt_order = np.argsort(gt[1][theirs], kind="mergesort")  # regular before crowd
      boxes, crowd = gt[0][theirs][gt_order], gt[1][theirs][gt_order]
      matched, on_crowd = match_detections(pred[0][mine][order], boxes, crowd, self.thresholds)
      self.scores[cls].append(pred[1][mine][order])
      self.matched[cls].append(matched)
      self.on_crowd[cls].append(on_crowd)
      self.num_gt[cls] += np.count_nonzero(~crowd)

  def update_batch(self, pred_boxes, pred_scores, pred_classes, gt_boxes, gt_classes, *,
                   pred_valid=None, gt_valid=None, gt_crowd=None, mask=None) -> None:
    """Padded static-shape batches: (B, N, ...) predictions, (B, M, ...) ground truth, with
    per-box validity (B, N) / (B, M) and a per-example `mask` (B,); padding is skipped."""
    batch, n, m = np.shape(pred_scores)[0], np.shape(pred_scores)[1], np.shape(gt_classes)[1]
    keep = _example_mask(mask, (batch,))
    pred_valid = np.ones((batch, n), bool) if pred_valid is None else np.asarray(pred_valid, bool)
    gt_valid = np.ones((batch, m), bool) if gt_valid is None else np.asarray(gt_valid, bool)
    gt_crowd = np.zeros((batch, m), bool) if gt_crowd is None else np.asarray(gt_crowd, bool)
    for image in np.nonzero(keep)[0]:
      p, g = pred_valid[image], gt_valid[image]
      self.update(np.asarray(pred_boxes)[image][p], np.asarray(pred_scores)[image][p],
                  np.asarray(pred_classes)[image][p], np.asarray(gt_boxes)[image][g],
                  np.asarray(gt_classes)[image][g], gt_crowd[image][g])

  def add(self, other: "DetectionAP") -> "DetectionAP":
    """Appends the images of `other` after this one's (COCO breaks score ties by image order)."""
    if other.num_classes != self.num_classes or not np.array_equal(other.thresholds,
                                                                   self.thresholds):
      raise ValueError(f"DetectionAP.add: expected {self.num_classes} classes and thresholds "
                       f"{self.thresholds}, found {other.num_classes} and {other.thresholds}")
    self.num_gt += other.num_gt
    for cls in range(self.num_classes):
      self.scores[cls] += other.scores[cls]
      self.matched[cls] += other.matched[cls]
      self.on_crowd[cls] += other.on_crowd[cls]
    return self

  def result(self) -> dict:
    ap = np.full((self.num_classes, len(self.thresholds)), NAN)
    for cls in np.nonzero(self.num_gt)[0]:
      empty = np.zeros((len(self.thresholds), 0), bool)
      ap[cls] = interpolated_ap(np.concatenate(self.scores[cls] + [np.zeros(0)]),
                                np.concatenate(self.matched[cls] + [empty], axis=1),
                                np.concatenate(self.on_crowd[cls] + [empty], axis=1),
                                self.num_gt[cls])
    out = {"ap": _nanmean(ap), "per_class_ap": [_nanmean(row) for row in ap]}
    for name, threshold in (("ap50", 0.5), ("ap75", 0.75)):
      at = np.nonzero(np.isclose(self.thresholds, threshold))[0]
      if at.size:
        out[name] = _nanmean(ap[:, at[0]])
    return out


def _detection_arrays(boxes, values, classes, num_classes: int, kind: str):
  """Validated (boxes (n, 4) float64, values (n,), classes (n,) int64) of one image."""
  boxes = np.asarray(boxes, np.float64)
  values, classes = np.asarray(values).reshape(-1), np.asarray(classes).reshape(-1)
  boxes = boxes.reshape(0, 4) if boxes.size == 0 else boxes
  if boxes.ndim != 2 or boxes.shape[1] != 4 or not len(boxes) == len(values) == len(classes):
    raise ValueError(f"DetectionAP.update: expected {kind} boxes (n, 4) with n scores/flags and "
                     f"n classes, found {boxes.shape}, {values.shape}, {classes.shape}")
  _check_integers("DetectionAP.update", **{f"{kind}_classes": classes})
  outside = (classes < 0) | (classes >= num_classes)
  if outside.any():
    raise ValueError(f"DetectionAP.update: expected {kind} classes in [0, {num_classes}), "
                     f"found {classes[outside][0]}")
  return boxes, values, classes.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Classification and retrieval


def _ranks_ahead(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Per row, how many other entries score at least as high as the labelled one (ties count
  against it; NaN scores as -inf)."""
  scores = _nan_as_lowest(scores)
  true = scores[np.arange(len(labels)), labels]
  return (scores >= true[:, None]).sum(1) - 1


def _classification_arrays(logits, labels, mask, where: str):
  logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"{where}: expected logits (n, classes) and labels (n,), found "
                     f"{logits.shape} and {labels.shape}")
  _check_integers(where, labels=labels)
  keep = _example_mask(mask, labels.shape)
  logits, labels = logits[keep], labels[keep].astype(np.int64)
  outside = (labels < 0) | (labels >= logits.shape[1])
  if outside.any():
    raise ValueError(f"{where}: expected labels in [0, {logits.shape[1]}), "
                     f"found {labels[outside][0]}")
  return logits, labels


class TopKAccuracy:
  """Streaming top-k accuracy: an example is a hit at k when fewer than k other classes score at
  least as high as its label (ties count as misses). `result()` -> {"top1": ..., "top5": ...}."""

  def __init__(self, ks: Sequence[int] = (1, 5)):
    self.ks = tuple(int(k) for k in ks)
    self.hits = np.zeros(len(self.ks), np.int64)
    self.count = 0

  def update(self, logits, labels, mask=None) -> None:
    logits, labels = _classification_arrays(logits, labels, mask, "TopKAccuracy.update")
    ahead = _ranks_ahead(logits, labels)
    self.hits += [np.count_nonzero(ahead < k) for k in self.ks]
    self.count += len(labels)

  def add(self, other: "TopKAccuracy") -> "TopKAccuracy":
    if other.ks != self.ks:
      raise ValueError(f"TopKAccuracy.add: expected ks {self.ks}, found {other.ks}")
    self.hits += other.hits
    self.count += other.count
    return self

  def result(self) -> dict:
    return {f"top{k}": _ratio(hits, self.count) for k, hits in zip(self.ks, self.hits)}


def topk_accuracy(logits, labels, ks: Sequence[int] = (1, 5), mask=None) -> dict:
  """Top-k accuracy of (n, classes) logits against (n,) labels; see TopKAccuracy for ties."""
  metric = TopKAccuracy(ks)
  metric.update(logits, labels, mask)
  return metric.result()


def _text_owners(image_to_texts, num_images: int, num_texts: int) -> np.ndarray:
  """For each text, the index of its one image; every image needs a text and vice versa."""
  if len(image_to_texts) != num_images:
    raise ValueError(f"retrieval_recall: expected image_to_texts for {num_images} images, "
                     f"found {len(image_to_texts)}")
  owner = np.full(num_texts, -1, np.int64)
  for image, texts in enumerate(image_to_texts):
    texts = np.asarray(texts, np.int64).reshape(-1)
    texts = texts[texts >= 0]  # rows of a -1-padded (images, captions) array
    if not texts.size or texts.max() >= num_texts or (owner[texts] >= 0).any():
      raise ValueError(f"retrieval_recall: image {image} has texts {texts.tolist()}: expected at "
                       f"least one, each in [0, {num_texts}) and owned by no other image")
    owner[texts] = image
  if (owner < 0).any():
    raise ValueError(f"retrieval_recall: text {np.nonzero(owner < 0)[0][0]} belongs to no image")
  return owner


def retrieval_recall(similarity, image_to_texts, ks: Sequence[int] = (1, 5, 10),
                     chunk: int = 256) -> dict:
  """Recall@k both ways of a (num_images, num_texts) similarity matrix.

  `image_to_texts[i]` lists the caption indices of image i (a list of lists, or an int array
  padded with -1). Image to text: image i is a hit when any of its captions is among its k most
  similar texts, i.e. fewer than k texts of other images score at least as high as its best
  caption. Text to image: a hit when fewer than k other images score at least as high as the
  text's own. Ties count as misses; NaN scores as -inf. Works on `chunk` rows (columns) at a time,
  so temporaries stay at chunk * max(num_images, num_texts) values.
  """
  sim = np.asarray(similarity)
  if sim.ndim != 2:
    raise ValueError(f"retrieval_recall: expected similarity (images, texts), found {sim.shape}")
  owner = _text_owners(image_to_texts, *sim.shape)
  image_ahead, text_ahead = [], []
  for start in range(0, sim.shape[0], chunk):
    rows = _nan_as_lowest(sim[start:start + chunk])
    own = owner[None, :] == np.arange(start, start + len(rows))[:, None]
    best = np.where(own, rows, -np.inf).max(1)
    image_ahead.append(((rows >= best[:, None]) & ~own).sum(1))
  for start in range(0, sim.shape[1], chunk):
    columns = sim[:, start:start + chunk].T.astype(np.float64)
    text_ahead.append(_ranks_ahead(columns, owner[start:start + chunk]))
  image_ahead, text_ahead = np.concatenate(image_ahead), np.concatenate(text_ahead)
  out = {}
  for k in ks:
    out[f"image_to_text/recall@{k}"] = float(np.mean(image_ahead < k))
    out[f"text_to_image/recall@{k}"] = float(np.mean(text_ahead < k))
  return out


def _nan_as_lowest(scores) -> np.ndarray:
  scores = np.asarray(scores, np.float64)
  return np.where(np.isnan(scores), -np.inf, scores)
