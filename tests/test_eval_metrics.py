"""Each evaluation metric against an independent reference written differently (plain Python
loops, another formula, pycocotools' algorithm transcribed loop by loop), on random inputs and on
hand-made cases whose numbers were worked out by hand."""

import math

import numpy as np
import pytest

from clipzoo_jax.evals import metrics

RNG = np.random.default_rng(0)
NAN = float("nan")


# --- segmentation -------------------------------------------------------------------------------

def _seg_reference(pred, target, num_classes, ignore_index):
  pairs = [(int(t), int(p)) for t, p in zip(target.ravel(), pred.ravel())
           if t != ignore_index and 0 <= t < num_classes]
  ious, recalls = [], []
  for c in range(num_classes):
    tp = sum(1 for t, p in pairs if t == c and p == c)
    fp = sum(1 for t, p in pairs if t != c and p == c)
    fn = sum(1 for t, p in pairs if t == c and p != c)
    ious.append(tp / (tp + fp + fn) if tp + fp + fn else None)
    recalls.append(tp / (tp + fn) if tp + fn else None)
  present = [v for v in ious if v is not None]
  present_recalls = [v for v in recalls if v is not None]
  return {"miou": sum(present) / len(present),
          "pixel_accuracy": sum(1 for t, p in pairs if t == p) / len(pairs),
          "mean_class_accuracy": sum(present_recalls) / len(present_recalls),
          "per_class_iou": [NAN if v is None else v for v in ious]}


def test_confusion_matrix_matches_loops_on_random_maps_with_ignore_pixels():
  for num_classes, ignore_index in ((5, 255), (7, -1)):
    target = RNG.integers(0, num_classes, size=(3, 9, 11))
    target[RNG.random(target.shape) < 0.2] = ignore_index
    target[0, 0, :3] = num_classes + 3  # outside the classes: ignored too
    target[target == 2] = 1  # class 2 absent from the ground truth
    pred = RNG.integers(0, num_classes, size=target.shape)
    pred[pred == 3] = 4  # class 3 never predicted
    metric = metrics.ConfusionMatrix(num_classes, ignore_index)
    metric.update(pred[:2], target[:2])
    metric.update(pred[2:], target[2:])
    found, expected = metric.result(), _seg_reference(pred, target, num_classes, ignore_index)
    for key in ("miou", "pixel_accuracy", "mean_class_accuracy"):
      assert found[key] == pytest.approx(expected[key], abs=1e-12), key
    np.testing.assert_allclose(found["per_class_iou"], expected["per_class_iou"])


def test_confusion_matrix_hand_made_absent_classes():
  # classes: 0 in both, 1 only in target, 2 only predicted, 3 in neither; 255 ignored
  target = np.array([[0, 0, 1, 1, 255, 0]])
  pred = np.array([[0, 2, 1, 0, 3, 0]])
  metric = metrics.ConfusionMatrix(4, ignore_index=255)
  metric.update(pred, target)
  result = metric.result()
  # class 0: tp 2, fp 1 (pixel 3), fn 1 (pixel 1) -> 2/4; class 1: tp 1, fn 1 -> 1/2; class 2: 0/1
  np.testing.assert_allclose(result["per_class_iou"], [0.5, 0.5, 0.0, NAN])
  assert result["miou"] == pytest.approx(1 / 3)
  assert result["pixel_accuracy"] == pytest.approx(3 / 5)
  assert result["mean_class_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_confusion_matrix_padding_mask_and_merge_count_every_pixel_once():
  target = RNG.integers(0, 4, size=(6, 5, 5))
  pred = RNG.integers(0, 4, size=(6, 5, 5))
  whole = metrics.ConfusionMatrix(4)
  whole.update(pred[:4], target[:4])
  padded = metrics.ConfusionMatrix(4)
  padded.update(pred, target, mask=np.array([1, 1, 0, 0, 0, 0], bool))
  rest = metrics.ConfusionMatrix(4)
  rest.update(pred[2:], target[2:], mask=np.array([1, 1, 0, 0], bool))
  np.testing.assert_array_equal(padded.add(rest).counts, whole.counts)
  with pytest.raises(ValueError, match=r"expected predicted classes in \[0, 4\), found 4"):
    whole.update(np.full((2, 2), 4), np.zeros((2, 2), int))
  with pytest.raises(ValueError, match=r"expected equal shapes.*\(2, 2\).*\(2, 3\)"):
    whole.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
  assert math.isnan(metrics.ConfusionMatrix(3).result()["miou"])


# --- depth --------------------------------------------------------------------------------------

def _depth_reference(pred, target, per_image):
  """Plain loops; per_image: metrics of each image averaged, else pooled over all pixels."""
  def errors(pairs):
    n = len(pairs)
    ratios = [max(p / g, g / p) for p, g in pairs]
    return {"abs_rel": sum(abs(p - g) / g for p, g in pairs) / n,
            "sq_rel": sum((p - g) ** 2 / g for p, g in pairs) / n,
            "rmse": math.sqrt(sum((p - g) ** 2 for p, g in pairs) / n),
            "rmse_log": math.sqrt(sum((math.log(p) - math.log(g)) ** 2 for p, g in pairs) / n),
            "log10": sum(abs(math.log10(p) - math.log10(g)) for p, g in pairs) / n,
            "delta1": sum(r < 1.25 for r in ratios) / n,
            "delta2": sum(r < 1.5625 for r in ratios) / n,
            "delta3": sum(r < 1.953125 for r in ratios) / n}
  images = [[(max(float(p), 1e-3), float(g)) for p, g in zip(pi.ravel(), gi.ravel())
             if math.isfinite(g) and g > 0] for pi, gi in zip(pred, target)]
  if not per_image:
    return errors([pair for image in images for pair in image])
  per = [errors(image) for image in images if image]
  return {key: sum(e[key] for e in per) / len(per) for key in per[0]}


def test_depth_matches_loops_per_pixel_and_per_image_with_invalid_pixels():
  target = RNG.uniform(0.5, 10, size=(4, 6, 7))
  target[RNG.random(target.shape) < 0.3] = 0.0
  target[0, 0, 0], target[1, 0, 0], target[2, 0, 0] = np.nan, -1.0, np.inf
  target[3, :3] = 0.0  # unequal valid counts make the two averages differ
  pred = target * RNG.uniform(0.7, 1.5, size=target.shape) + RNG.normal(0, 0.3, target.shape)
  pred[0, 1, :2] = -2.0  # clipped to min_depth
  for average in ("pixel", "image"):
    metric = metrics.DepthMetrics(average=average)
    metric.update(pred[:3], target[:3])
    metric.update(pred[3:], target[3:])
    expected = _depth_reference(pred, target, per_image=average == "image")
    found = metric.result()
    for key, value in expected.items():
      assert found[key] == pytest.approx(value, rel=1e-10), (average, key)
  pooled = metrics.DepthMetrics("pixel")
  pooled.update(pred, target)
  assert pooled.result()["rmse"] != pytest.approx(metric.result()["rmse"], rel=1e-3)


def test_depth_hand_made_invalid_pixels_valid_mask_and_padding():
  target = np.array([[1.0, 2.0, 0.0, np.nan, 3.0]])
  pred = np.array([[1.1, 1.0, 5.0, 5.0, 7.0]])
  valid = np.array([[True, True, True, True, False]])
  metric = metrics.DepthMetrics()
  metric.update(pred, target, valid=valid)
  metric.update(pred * 9, target, mask=np.array([False]))  # a padded example
  result = metric.result()
  assert result["abs_rel"] == pytest.approx((0.1 + 0.5) / 2)
  assert result["rmse"] == pytest.approx(math.sqrt((0.01 + 1.0) / 2))
  assert result["delta1"] == result["delta2"] == result["delta3"] == pytest.approx(0.5)
  diverged = metrics.DepthMetrics()
  diverged.update(np.array([[np.nan, 1.0]]), np.array([[1.0, 1.0]]))
  assert math.isnan(diverged.result()["delta1"])
  assert all(math.isnan(v) for v in metrics.DepthMetrics().result().values())


def test_scale_shift_alignment_is_the_least_squares_solution_per_image():
  pred = RNG.uniform(0.1, 1.0, size=(3, 5, 6, 1))
  target = 2.5 * pred + 0.7 + RNG.normal(0, 0.05, pred.shape)
  target[1] = -0.3 * pred[1] + 4.0
  valid = RNG.random(pred.shape) > 0.3
  target[~valid] = 1e6  # garbage where invalid must not move the fit
  aligned = metrics.align_scale_shift(pred, target, valid)
  for image in range(3):
    v = valid[image].ravel()
    design = np.stack([pred[image].ravel()[v], np.ones(v.sum())], axis=1)
    (scale, shift), *_ = np.linalg.lstsq(design, target[image].ravel()[v], rcond=None)
    np.testing.assert_allclose(aligned[image], scale * pred[image] + shift, rtol=1e-9)
  np.testing.assert_allclose(aligned[1][valid[1]], target[1][valid[1]], rtol=1e-9)
  constant = metrics.align_scale_shift(np.ones((1, 2, 2)), np.array([[[1.0, 2.0], [3.0, 0.0]]]))
  np.testing.assert_allclose(constant, 2.0)  # mean of the valid (> 0) targets
  with pytest.raises(ValueError, match=r"leading axis, found \(4, 4\)"):
    metrics.align_scale_shift(np.ones((4, 4)), np.ones((4, 4)))


def test_median_scale_alignment():
  pred = RNG.uniform(0.5, 2.0, size=(2, 4, 5))
  target = RNG.uniform(1.0, 9.0, size=(2, 4, 5))
  target[0, 0] = 0.0
  aligned = metrics.align_median_scale(pred, target)
  for image in range(2):
    v = target[image] > 0
    scale = np.median(target[image][v]) / np.median(pred[image][v])
    np.testing.assert_allclose(aligned[image], scale * pred[image], rtol=1e-12)
    assert np.median(aligned[image][v]) == pytest.approx(np.median(target[image][v]))


# --- normals ------------------------------------------------------------------------------------

def _unit(v):
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _chord_angle(a, b):
  """Angle from the chord between unit vectors, 2 asin(|a - b| / 2): another exact formula."""
  return np.degrees(2 * np.arcsin(np.minimum(1.0, np.linalg.norm(_unit(a) - _unit(b), axis=-1)
                                             / 2)))


def test_angular_error_at_zero_90_180_degrees_and_the_poles():
  north, south = np.array([0.0, 0.0, 1.0]), np.array([0.0, 0.0, -1.0])
  tiny = 1e-7  # radians; arccos of the rounded dot product would return 0 here
  near_north = np.array([math.sin(tiny), 0.0, math.cos(tiny)])
  cases = [(north, north, 0.0), (north, south, 180.0), (south, 3 * north, 180.0),
           (near_north, north, math.degrees(tiny)), (-near_north, north, 180 - math.degrees(tiny)),
           (np.array([1.0, 0, 0]), north, 90.0), (np.array([0.0, 5.0, 0]), south, 90.0),
           (np.array([1.0, 1.0, 1.0]), np.array([2.0, 2.0, 2.0]), 0.0),
           (np.zeros(3), north, 90.0)]  # a zero prediction has no direction
  for pred, target, expected in cases:
    found = metrics.angular_error_degrees(pred[None], target[None])[0]
    assert found == pytest.approx(expected, rel=1e-9, abs=1e-12), (pred, target)


def test_normals_match_the_chord_formula_and_loops_on_random_vectors():
  target = _unit(RNG.normal(size=(3, 8, 9, 3)))
  pred = 0.5 * (target + RNG.normal(0, 0.4, size=target.shape)) * RNG.uniform(0.5, 3, (3, 8, 9, 1))
  pred[0, 0, 0] = -target[0, 0, 0]  # antiparallel
  target[1, 1, :4] = 0.0  # zero-norm targets are invalid
  valid = RNG.random((3, 8, 9)) > 0.1
  metric = metrics.NormalsMetrics()
  metric.update(pred[:2], target[:2], valid[:2])
  metric.update(pred[2:], target[2:], valid[2:])
  keep = valid & (np.linalg.norm(target, axis=-1) > 0)
  angles = [float(a) for a in _chord_angle(pred[keep], target[keep])]
  found = metric.result()
  assert found["mean"] == pytest.approx(sum(angles) / len(angles), rel=1e-9)
  assert found["rmse"] == pytest.approx(math.sqrt(sum(a * a for a in angles) / len(angles)))
  for key, limit in (("within_11_25", 11.25), ("within_22_5", 22.5), ("within_30", 30.0)):
    assert found[key] == pytest.approx(100 * sum(a < limit for a in angles) / len(angles)), key
  assert abs(found["median"] - np.median(angles)) <= 0.005 + 1e-9


@pytest.mark.parametrize("bin_degrees", [0.01, 1.0, 7.0])
def test_normals_median_is_within_half_a_bin_of_the_exact_median(bin_degrees):
  errors = []
  for count in (1, 2, 7, 1000, 1001):
    target = _unit(RNG.normal(size=(count, 3)))
    pred = target + RNG.normal(0, RNG.uniform(0.05, 2), size=(count, 3))
    metric = metrics.NormalsMetrics(median_bin_degrees=bin_degrees)
    metric.update(pred, target, mask=np.ones(count, bool))
    exact = np.median(metrics.angular_error_degrees(pred, target))
    errors.append(abs(metric.result()["median"] - exact))
  assert max(errors) <= bin_degrees / 2 + 1e-9
  if bin_degrees > 1:
    assert max(errors) > 0  # the bound is what a coarse histogram actually spends


def test_normals_padding_and_non_finite_predictions():
  target = _unit(RNG.normal(size=(2, 4, 3)))
  pred = target + 0.1
  metric = metrics.NormalsMetrics()
  metric.update(pred, target, mask=np.array([True, False]))
  alone = metrics.NormalsMetrics()
  alone.update(pred[:1], target[:1])
  assert metric.result() == alone.result()
  pred[0, 0] = np.nan
  alone.update(pred, target)
  assert math.isnan(alone.result()["mean"]) and math.isnan(alone.result()["median"])
  with pytest.raises(ValueError, match=r"expected \(\.\.\., 3\) vectors, found \(2, 4\)"):
    metric.update(np.ones((2, 4)), np.ones((2, 4)))


# --- detection ----------------------------------------------------------------------------------

def _loop_iou(d, g, crowd):
  inter = (max(0.0, min(d[2], g[2]) - max(d[0], g[0]))
           * max(0.0, min(d[3], g[3]) - max(d[1], g[1])))
  area_d, area_g = (d[2] - d[0]) * (d[3] - d[1]), (g[2] - g[0]) * (g[3] - g[1])
  union = area_d if crowd else area_d + area_g - inter
  return inter / union if union > 0 else 0.0


def _coco_evaluate_image(dt, gt, thresholds):
  """pycocotools COCOeval.evaluateImg for area 'all', transcribed into loops."""
  matched = [[False] * len(dt) for _ in thresholds]
  ignored = [[False] * len(dt) for _ in thresholds]
  for ti, threshold in enumerate(thresholds):
    gt_matched = [False] * len(gt)
    for di, (box, _, _) in enumerate(dt):
      best, m = min(threshold, 1 - 1e-10), -1
      for gi, (gbox, _, crowd) in enumerate(gt):
        if gt_matched[gi] and not crowd:
          continue
        if m > -1 and not gt[m][2] and crowd:
          break
        overlap = _loop_iou(box, gbox, crowd)
        if overlap < best:
          continue
        best, m = overlap, gi
      if m > -1:
        matched[ti][di], ignored[ti][di], gt_matched[m] = True, gt[m][2], True
  return matched, ignored


def _coco_reference(images, num_classes, thresholds, max_det=100):
  """Per class, AP at each threshold (None without regular ground truth), COCOeval.accumulate."""
  per_class = []
  for c in range(num_classes):
    scores, matched, ignored, num_gt = [], [[] for _ in thresholds], [[] for _ in thresholds], 0
    for image in images:
      gt = sorted([g for g in image["gt"] if g[1] == c], key=lambda g: g[2])
      dt = sorted([d for d in image["dt"] if d[2] == c], key=lambda d: -d[1])[:max_det]
      num_gt += sum(1 for g in gt if not g[2])
      m, ig = _coco_evaluate_image(dt, gt, thresholds)
      scores += [d[1] for d in dt]
      for ti in range(len(thresholds)):
        matched[ti] += m[ti]
        ignored[ti] += ig[ti]
    if num_gt == 0:
      per_class.append(None)
      continue
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    aps = []
    for ti in range(len(thresholds)):
      tp = fp = 0
      recall, precision = [], []
      for i in order:
        if not ignored[ti][i]:
          tp, fp = tp + matched[ti][i], fp + (not matched[ti][i])
        recall.append(tp / num_gt)
        precision.append(tp / (tp + fp) if tp + fp else 0.0)
      for i in range(len(precision) - 1, 0, -1):
        precision[i - 1] = max(precision[i - 1], precision[i])
      q = []
      for r in np.linspace(0, 1, 101):
        reached = [i for i, value in enumerate(recall) if value >= r]
        q.append(precision[reached[0]] if reached else 0.0)
      aps.append(sum(q) / len(q))
    per_class.append(aps)
  return per_class


def _random_box(rng=RNG):
  y, x = rng.uniform(0, 0.8, size=2)
  h, w = rng.uniform(0.05, 0.3, size=2)
  return [y, x, y + h, x + w]


def _random_images(num_images, num_classes, seed):
  """Ground truth with crowd boxes and empty images; detections near it (duplicates become false
  positives), some of the wrong class, some anywhere; scores rounded to 0.1 so that ties happen."""
  rng = np.random.default_rng(seed)
  images = []
  for _ in range(num_images):
    gt = [(_random_box(rng), int(rng.integers(num_classes)), bool(rng.random() < 0.15))
          for _ in range(rng.integers(0, 5))]
    dt = []
    for box, cls, _ in gt:
      for _ in range(rng.integers(0, 3)):
        jitter = (np.array(box) + rng.normal(0, 0.01, 4)).tolist()
        dt.append((jitter, round(rng.uniform(), 1), cls if rng.random() < 0.85 else 0))
    dt += [(_random_box(rng), round(rng.uniform(), 1), int(rng.integers(num_classes)))
           for _ in range(rng.integers(0, 3))]
    images.append({"gt": gt, "dt": dt})
  return images


def _feed(metric, images):
  for image in images:
    dt, gt = image["dt"], image["gt"]
    metric.update(np.array([d[0] for d in dt]).reshape(-1, 4), np.array([d[1] for d in dt]),
                  np.array([d[2] for d in dt], int), np.array([g[0] for g in gt]).reshape(-1, 4),
                  np.array([g[1] for g in gt], int), np.array([g[2] for g in gt], bool))
  return metric.result()


@pytest.mark.parametrize("max_det", [100, 2])
def test_detection_ap_matches_the_loop_coco_reference_on_random_sets(max_det):
  num_classes = 4  # class 3 never has ground truth
  images = _random_images(25, 3, seed=1) + [{"gt": [], "dt": []}]
  images[3]["dt"].append((_random_box(), 0.9, 3))
  found = _feed(metrics.DetectionAP(num_classes, max_detections=max_det), images)
  thresholds = metrics.COCO_IOU_THRESHOLDS
  expected = _coco_reference(images, num_classes, thresholds, max_det)
  assert expected[3] is None and math.isnan(found["per_class_ap"][3])
  per_class = [np.mean(aps) for aps in expected if aps is not None]
  assert found["ap"] == pytest.approx(np.mean(per_class), abs=1e-12)
  assert found["ap50"] == pytest.approx(np.mean([a[0] for a in expected if a]), abs=1e-12)
  assert found["ap75"] == pytest.approx(np.mean([a[5] for a in expected if a]), abs=1e-12)
  np.testing.assert_allclose(found["per_class_ap"][:3], per_class, atol=1e-12)
  assert 0.05 < found["ap"] < 0.95  # a set that exercises both hits and misses


def _box(y, x, h, w):
  return [y, x, y + h, x + w]


def test_detection_ap_hand_computed_value():
  gt = np.array([_box(0.1, 0.1, 0.2, 0.2), _box(0.5, 0.5, 0.2, 0.2)])
  pred = np.array([gt[0], _box(0.8, 0.0, 0.1, 0.1), gt[1]])
  metric = metrics.DetectionAP(1)
  metric.update(pred, np.array([0.9, 0.8, 0.7]), np.zeros(3, int), gt, np.zeros(2, int))
  metric.update(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), np.zeros((0, 4)),
                np.zeros(0, int))  # an empty image changes nothing
  # TP, FP, TP: precision 1, 1/2, 2/3 -> envelope 1, 2/3, 2/3; recall 1/2, 1/2, 1
  # 51 recall thresholds in [0, 0.5] read 1, the 50 above read 2/3
  expected = (51 * 1 + 50 * 2 / 3) / 101
  result = metric.result()
  for key in ("ap", "ap50", "ap75"):
    assert result[key] == pytest.approx(expected, abs=1e-12), key
  assert result["per_class_ap"] == [pytest.approx(expected, abs=1e-12)]


def test_detection_ap_counts_thresholds_below_the_overlap():
  gt = np.array([_box(0.0, 0.0, 0.5, 0.5)])
  pred = np.array([_box(0.0, 0.0, 0.5, 0.31)])  # IoU 0.62: a hit at 0.5, 0.55, 0.6 only
  assert metrics.box_iou(pred, gt)[0, 0] == pytest.approx(0.62)
  metric = metrics.DetectionAP(2)
  metric.update(pred, np.array([0.5]), np.array([1]), gt, np.array([1]))
  result = metric.result()
  assert result["ap"] == pytest.approx(0.3) and result["ap50"] == 1.0 and result["ap75"] == 0.0
  assert math.isnan(result["per_class_ap"][0]) and result["per_class_ap"][1] == pytest.approx(0.3)


def test_detection_ap_equal_overlaps_go_to_the_later_ground_truth_as_in_pycocotools():
  gt = np.array([[0, 0, 0.5, 0.75], [0, 0.25, 0.5, 1.0]])  # binary fractions: exact ties
  pred = np.array([[0, 0.125, 0.5, 0.875], gt[0]])  # first: IoU 5/7 with both; second: gt 0
  metric = metrics.DetectionAP(1)
  metric.update(pred, np.array([0.9, 0.8]), np.zeros(2, int), gt, np.zeros(2, int))
  # the first detection takes gt 1, so the second still finds gt 0: both hits up to IoU 0.70;
  # from 0.75 on: a false positive then a hit on gt 0, precision 1/2 up to recall 1/2
  expected = (5 * 1.0 + 5 * 51 * 0.5 / 101) / 10
  assert metric.result()["ap"] == pytest.approx(expected, abs=1e-12)
  images = [{"gt": [(g, 0, False) for g in gt], "dt": [(pred[0], 0.9, 0), (pred[1], 0.8, 0)]}]
  reference = _coco_reference(images, 1, metrics.COCO_IOU_THRESHOLDS)
  assert np.mean(reference[0]) == pytest.approx(expected, abs=1e-12)


def test_detection_ap_crowd_regions_are_neither_hits_misses_nor_false_positives():
  person, crowd = _box(0.0, 0.0, 0.2, 0.2), _box(0.5, 0.5, 0.5, 0.5)
  inside_crowd = _box(0.6, 0.6, 0.1, 0.1)  # IoU with the crowd box 0.04, overlap of itself 1
  elsewhere = _box(0.0, 0.6, 0.1, 0.1)
  gt, gt_classes = np.array([person, crowd]), np.zeros(2, int)
  preds = np.array([person, inside_crowd, inside_crowd, elsewhere])
  scores = np.array([0.9, 0.95, 0.8, 0.7])
  with_crowd = metrics.DetectionAP(1)
  with_crowd.update(preds, scores, np.zeros(4, int), gt, gt_classes, np.array([False, True]))
  # sorted: crowd (ignored), person TP, crowd (ignored), elsewhere FP: precision 1 until recall 1
  assert with_crowd.result()["ap"] == pytest.approx(1.0)
  no_crowd = metrics.DetectionAP(1)
  no_crowd.update(preds, scores, np.zeros(4, int), gt, gt_classes)
  # the crowd box is now a regular miss and both detections in it are false positives
  # sorted FP, TP: precision 1/2 envelope up to recall 1/2, nothing above
  assert no_crowd.result()["ap"] == pytest.approx(51 * 0.5 / 101)
  only_crowd = metrics.DetectionAP(2)
  only_crowd.update(preds[:1], scores[:1], np.array([1]), gt[1:], np.array([1]), np.array([True]))
  assert math.isnan(only_crowd.result()["ap"])  # a class with only crowd boxes has no AP


def test_detection_ap_padded_batches_and_merge_match_per_image_updates():
  images = _random_images(6, 3, seed=2)
  expected = _feed(metrics.DetectionAP(3), images)
  n, m = 12, 6
  batch = {"pred_boxes": np.zeros((7, n, 4)), "pred_scores": np.zeros((7, n)),
           "pred_classes": np.zeros((7, n), int), "gt_boxes": np.ones((7, m, 4)),
           "gt_classes": np.zeros((7, m), int)}
  valid = {"pred_valid": np.zeros((7, n), bool), "gt_valid": np.zeros((7, m), bool),
           "gt_crowd": np.zeros((7, m), bool)}
  for i, image in enumerate(images + images[:1]):  # the 7th example is padding
    for j, (box, score, cls) in enumerate(image["dt"][:n]):
      batch["pred_boxes"][i, j], batch["pred_scores"][i, j], batch["pred_classes"][i, j] = (
          box, score, cls)
      valid["pred_valid"][i, j] = True
    for j, (box, cls, crowd) in enumerate(image["gt"]):
      batch["gt_boxes"][i, j], batch["gt_classes"][i, j] = box, cls
      valid["gt_valid"][i, j], valid["gt_crowd"][i, j] = True, crowd
  assert max(len(image["dt"]) for image in images) <= n
  first, second = metrics.DetectionAP(3), metrics.DetectionAP(3)
  first.update_batch(*(v[:3] for v in batch.values()), **{k: v[:3] for k, v in valid.items()})
  second.update_batch(*(v[3:] for v in batch.values()), **{k: v[3:] for k, v in valid.items()},
                      mask=np.array([1, 1, 1, 0], bool))
  assert first.add(second).result() == expected


def test_box_iou_against_loops():
  a = np.array([_random_box() for _ in range(5)] + [[0.2, 0.2, 0.1, 0.1]])  # last: inverted
  b = np.array([_random_box() for _ in range(4)] + [a[0].tolist()])
  found = metrics.box_iou(a, b)
  for i in range(6):
    for j in range(5):
      expected = 0.0 if i == 5 else _loop_iou(a[i], b[j], crowd=False)
      assert found[i, j] == pytest.approx(expected, abs=1e-12)
  assert found[0, 4] == 1.0
  half = metrics.box_iou(np.array([[0, 0, 1, 1.0]]), np.array([[0, 0.5, 1, 1.5]]))
  assert half[0, 0] == pytest.approx(1 / 3)


# --- classification and retrieval ---------------------------------------------------------------

def _topk_reference(logits, labels, k):
  """Sort each row, placing the label after every class it ties with (pessimistic)."""
  hits = 0
  for row, label in zip(logits, labels):
    order = sorted(range(len(row)), key=lambda c: (-row[c], c == label))
    hits += label in order[:k]
  return hits / len(labels)


def test_topk_accuracy_matches_sorting_with_ties_against_the_label():
  logits = RNG.integers(0, 4, size=(50, 10)).astype(float)  # many ties
  labels = RNG.integers(0, 10, size=50)
  found = metrics.topk_accuracy(logits, labels, ks=(1, 3, 5))
  for k in (1, 3, 5):
    assert found[f"top{k}"] == pytest.approx(_topk_reference(logits, labels, k))
  constant = metrics.topk_accuracy(np.zeros((4, 10)), np.arange(4), ks=(1, 5, 10))
  assert constant == {"top1": 0.0, "top5": 0.0, "top10": 1.0}
  nan_row = metrics.topk_accuracy(np.array([[np.nan, 0.0, 1.0]]), np.array([0]), ks=(1, 2))
  assert nan_row == {"top1": 0.0, "top2": 0.0}


def test_streaming_topk_masks_padding_and_merges():
  logits, labels = RNG.normal(size=(20, 7)), RNG.integers(0, 7, size=20)
  streaming = metrics.TopKAccuracy((1, 5))
  streaming.update(logits[:8], labels[:8])
  padded_labels = np.concatenate([labels[8:], np.zeros(4, int)])
  other = metrics.TopKAccuracy((1, 5))
  other.update(np.concatenate([logits[8:], np.zeros((4, 7))]), padded_labels,
               mask=np.arange(16) < 12)
  assert streaming.add(other).result() == pytest.approx(metrics.topk_accuracy(logits, labels))
  assert streaming.count == 20
  with pytest.raises(ValueError, match=r"expected labels in \[0, 7\), found 7"):
    streaming.update(logits[:1], np.array([7]))


def _retrieval_reference(sim, image_to_texts, k):
  owner = {t: i for i, texts in enumerate(image_to_texts) for t in texts}
  image_hits = 0
  for i, row in enumerate(sim):
    order = sorted(range(len(row)), key=lambda t: (-row[t], owner[t] == i))
    image_hits += any(owner[t] == i for t in order[:k])
  text_hits = 0
  for t in range(sim.shape[1]):
    order = sorted(range(len(sim)), key=lambda i: (-sim[i, t], i == owner[t]))
    text_hits += owner[t] in order[:k]
  return image_hits / len(sim), text_hits / sim.shape[1]


def test_retrieval_recall_with_several_captions_per_image():
  # image 0 owns texts 0, 1; image 1 owns texts 2, 3; image 2 owns text 4
  sim = np.array([[0.1, 0.9, 0.8, 0.0, 0.0],
                  [0.5, 0.0, 0.2, 0.1, 0.3],
                  [0.0, 0.2, 0.7, 0.6, 0.7]])
  owners = [[0, 1], [2, 3], [4]]
  found = metrics.retrieval_recall(sim, owners, ks=(1, 2))
  # image to text: 0 hits at 1 (text 1); 1 ranks texts 0, 4 above its best (2): miss at 1 and 2;
  # 2 ties its text 4 with text 2: miss at 1, hit at 2
  assert found["image_to_text/recall@1"] == pytest.approx(1 / 3)
  assert found["image_to_text/recall@2"] == pytest.approx(2 / 3)
  # text to image: t0 -> 1 (miss@1, 0 second: hit@2), t1 -> 0 hit, t2 -> 0 then 2 then 1: miss both,
  # t3 -> 2 above 1: hit@2, t4 -> 2 hit
  assert found["text_to_image/recall@1"] == pytest.approx(2 / 5)
  assert found["text_to_image/recall@2"] == pytest.approx(4 / 5)
  padded = metrics.retrieval_recall(sim, np.array([[0, 1], [2, 3], [4, -1]]), ks=(1, 2))
  assert padded == found


def test_retrieval_recall_matches_sorting_on_random_ties_in_chunks():
  num_images, captions = 13, 3
  owners = RNG.permutation(num_images * captions).reshape(num_images, captions).tolist()
  sim = RNG.integers(0, 6, size=(num_images, num_images * captions)).astype(float)
  found = metrics.retrieval_recall(sim, owners, ks=(1, 5, 10), chunk=4)
  for k in (1, 5, 10):
    image, text = _retrieval_reference(sim, owners, k)
    assert found[f"image_to_text/recall@{k}"] == pytest.approx(image)
    assert found[f"text_to_image/recall@{k}"] == pytest.approx(text)
  with pytest.raises(ValueError, match="owned by no other image"):
    metrics.retrieval_recall(sim[:2, :3], [[0, 1], [1, 2]])
  with pytest.raises(ValueError, match="text 2 belongs to no image"):
    metrics.retrieval_recall(sim[:2, :3], [[0], [1]])
