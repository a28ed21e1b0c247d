"""The pseudo-label TFRecord schema: one `tf.train.Example` per image, and its label codecs.

This is the contract between the pseudo-labeller (or the toy-world generator) and the loader.
A task whose expert produced nothing for an image is absent from the record; presence becomes a
per-task validity mask in the loader. Encoding is NumPy + Pillow so writers need no TF graph;
`parse_example` decodes back to NumPy for tools and tests; the loader decodes in tf.data.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

SCHEMA_VERSION = 1
TASKS = ("seg", "depth", "normals", "det")
SEG_IGNORE_U8 = 255
SEG_IGNORE_U16 = 65535
DEPTH_MAX_STEPS = 65535


class RecordError(ValueError):
  """A record does not follow the schema; the message names the record key and the field."""


@dataclasses.dataclass
class Labels:
  """Labels of one image, any subset of the tasks. Arrays are NumPy, at label resolution.

  seg: (H, W) int class map, ignore = 255 (uint8) or 65535 (uint16).
  depth: (H, W) float32 depth (or inverse depth), 0 or non-finite = invalid.
  normals: (H, W, 3) float32 unit vectors in camera frame; all-zero or non-finite = invalid.
  det_boxes: (N, 4) float32 normalized ymin, xmin, ymax, xmax; det_classes (N,) int; det_scores (N,).
  """
  seg: np.ndarray | None = None
  depth: np.ndarray | None = None
  normals: np.ndarray | None = None
  det_boxes: np.ndarray | None = None
  det_classes: np.ndarray | None = None
  det_scores: np.ndarray | None = None

  def tasks(self) -> tuple[str, ...]:
    present = {"seg": self.seg is not None, "depth": self.depth is not None,
               "normals": self.normals is not None, "det": self.det_boxes is not None}
    return tuple(t for t in TASKS if present[t])


def box_from_mask(mask: np.ndarray) -> np.ndarray | None:
  """The `det_boxes` row of a boolean (H, W) mask's true pixels, float32; None if it has none.

  A box spans whole pixels: true pixels in rows r0..r1 give ymin = r0 / H, ymax = (r1 + 1) / H.
  """
  mask = np.asarray(mask, bool)
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  if rows.size == 0:
    return None
  height, width = mask.shape
  return np.array([rows[0] / height, cols[0] / width, (rows[-1] + 1) / height,
                   (cols[-1] + 1) / width], np.float32)


# ---------------------------------------------------------------------------------------------
# Label codecs (NumPy <-> PNG bytes). Pure functions, each the inverse of its partner.


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
  """PNG bytes of a uint8 (H,W), uint8 (H,W,3) or uint16 (H,W) array. Level 1: fast, still small."""
  if array.dtype == np.uint16:
    image = Image.fromarray(array.astype("<u2"))
  elif array.dtype == np.uint8:
    image = Image.fromarray(array)
  else:
    raise TypeError(f"encode_png takes uint8 or uint16, found {array.dtype}")
  buffer = io.BytesIO()
  image.save(buffer, format="PNG", compress_level=compress_level)
  return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
  image = Image.open(io.BytesIO(data))
  if image.mode in ("I;16", "I;16B", "I"):
    return np.asarray(image, dtype=np.uint16)
  return np.asarray(image)


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def encode_seg(class_map: np.ndarray, num_classes: int) -> bytes:
  """Class map to PNG: uint8 when classes fit below the ignore value 255, else uint16."""
  class_map = np.asarray(class_map)
  if num_classes < SEG_IGNORE_U8:
    ignore, dtype = SEG_IGNORE_U8, np.uint8
  elif num_classes < SEG_IGNORE_U16:
    ignore, dtype = SEG_IGNORE_U16, np.uint16
  else:
    raise ValueError(f"encode_seg: {num_classes} classes do not fit in a 16-bit PNG")
  valid = (class_map >= 0) & (class_map < num_classes)
  return encode_png(np.where(valid, class_map, ignore).astype(dtype))


def depth_scale_for(depth: np.ndarray) -> float:
  """Units per PNG step so the largest valid depth uses the full 16-bit range."""
  valid = np.isfinite(depth) & (depth > 0)
  top = float(depth[valid].max()) if valid.any() else 1.0
  return top / DEPTH_MAX_STEPS


def encode_depth(depth: np.ndarray, scale: float | None = None) -> tuple[bytes, float]:
  """Depth to a 16-bit PNG and its scale (units per step). 0 marks invalid pixels.

  Valid pixels round to at least one step, so a tiny positive depth never turns invalid.
  The quantization error is at most scale / 2.
  """
  depth = np.asarray(depth, np.float64)
  scale = depth_scale_for(depth) if scale is None else float(scale)
  valid = np.isfinite(depth) & (depth > 0)
  steps = np.zeros(depth.shape, np.float64)
  steps[valid] = np.clip(np.rint(depth[valid] / scale), 1, DEPTH_MAX_STEPS)
  return encode_png(steps.astype(np.uint16)), scale


def decode_depth(data: bytes, scale: float) -> np.ndarray:
  """Back to float32 depth; invalid pixels are 0."""
  return decode_png(data).astype(np.float32) * np.float32(scale)


def encode_normals(normals: np.ndarray) -> bytes:
  """Unit normals to an RGB PNG, xyz in [-1, 1] mapped to [0, 255]; (0,0,0) marks invalid."""
  normals = np.asarray(normals, np.float32)
  norm = np.linalg.norm(normals, axis=-1)
  valid = np.isfinite(norm) & (norm > 1e-6)
  unit = np.where(valid[..., None], normals / np.where(valid, norm, 1.0)[..., None], 0.0)
  pixels = np.rint((np.clip(unit, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
  pixels[~valid] = 0
  return encode_png(pixels)


def decode_normals(data: bytes) -> tuple[np.ndarray, np.ndarray]:
  """Back to (unit normals float32 (H,W,3), valid bool (H,W))."""
  pixels = decode_png(data)
  valid = pixels.any(axis=-1)
  xyz = pixels.astype(np.float32) / 127.5 - 1.0
  norm = np.linalg.norm(xyz, axis=-1, keepdims=True)
  xyz = np.where(valid[..., None], xyz / np.maximum(norm, 1e-6), 0.0)
  return xyz.astype(np.float32), valid


# ---------------------------------------------------------------------------------------------
# tf.train.Example assembly. TensorFlow is imported lazily: the schema is usable without it.


def _bytes_feature(tf, value: bytes):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _float_feature(tf, values):
  return tf.train.Feature(float_list=tf.train.FloatList(value=list(np.asarray(values, np.float32).ravel())))


def _int_feature(tf, values):
  return tf.train.Feature(int64_list=tf.train.Int64List(value=list(np.asarray(values, np.int64).ravel())))


def make_example(key: str, image_jpeg: bytes, text: str, labels: Labels | None = None,
                 num_seg_classes: int = 254, depth_scale: float | None = None) -> bytes:
  """Serialized `tf.train.Example` in the schema of DESIGN.md.

  `image_jpeg` is stored as given (the source JPEG, not re-encoded).
  """
  import tensorflow as tf

  labels = labels or Labels()
  feature = {
      "key": _bytes_feature(tf, key.encode("utf-8")),
      "image/encoded": _bytes_feature(tf, image_jpeg),
      "text": _bytes_feature(tf, text.encode("utf-8")),
  }
  if labels.seg is not None:
    feature["seg/encoded"] = _bytes_feature(tf, encode_seg(labels.seg, num_seg_classes))
  if labels.depth is not None:
    data, scale = encode_depth(labels.depth, depth_scale)
    feature["depth/encoded"] = _bytes_feature(tf, data)
    feature["depth/scale"] = _float_feature(tf, [scale])
  if labels.normals is not None:
    feature["normals/encoded"] = _bytes_feature(tf, encode_normals(labels.normals))
  if labels.det_boxes is not None:
    boxes = np.asarray(labels.det_boxes, np.float32).reshape(-1, 4)
    classes = np.asarray(labels.det_classes, np.int64).reshape(-1)
    scores = (np.ones(len(classes), np.float32) if labels.det_scores is None
              else np.asarray(labels.det_scores, np.float32).reshape(-1))
    if not len(boxes) == len(classes) == len(scores):
      raise RecordError(f"record {key!r}: det/boxes has {len(boxes)} boxes, det/classes "
                        f"{len(classes)}, det/scores {len(scores)}; expected equal counts")
    feature["det/boxes"] = _float_feature(tf, boxes)
    feature["det/classes"] = _int_feature(tf, classes)
    feature["det/scores"] = _float_feature(tf, scores)
    # Parsers cannot tell an empty list from an absent one; the count keeps "expert ran, found
    # no objects" (a valid negative label) apart from "no det label".
    feature["det/count"] = _int_feature(tf, [len(classes)])
  # deterministic: the feature map's order otherwise follows Python's per-process string hash,
  # and a rerun of the same job would write different bytes (and shard checksums).
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(
      deterministic=True)


def parse_example(serialized: bytes) -> dict:
  """Decode one serialized record to NumPy: key, image, text, and the labels present.

  Returns a dict with `key` (str), `image` (H,W,3 uint8), `text` (str), `labels` (Labels) and
  `depth_scale` (float or None). Used by tools, tests and visualization, not the hot loader path.
  """
  import tensorflow as tf

  example = tf.train.Example.FromString(serialized)
  feature = example.features.feature

  def get_bytes(name):
    return feature[name].bytes_list.value[0] if name in feature else None

  key = (get_bytes("key") or b"").decode("utf-8")
  for required in ("key", "image/encoded", "text"):
    if required not in feature:
      raise RecordError(f"record {key or '<no key>'!r}: required feature {required!r} missing; "
                        f"found {sorted(feature.keys())}")
  labels = Labels()
  if "seg/encoded" in feature:
    labels.seg = decode_png(get_bytes("seg/encoded"))
  depth_scale = None
  if "depth/encoded" in feature:
    depth_scale = float(feature["depth/scale"].float_list.value[0])
    labels.depth = decode_depth(get_bytes("depth/encoded"), depth_scale)
  if "normals/encoded" in feature:
    labels.normals, _ = decode_normals(get_bytes("normals/encoded"))
  if "det/boxes" in feature:
    labels.det_boxes = np.asarray(feature["det/boxes"].float_list.value, np.float32).reshape(-1, 4)
    labels.det_classes = np.asarray(feature["det/classes"].int64_list.value, np.int64)
    labels.det_scores = np.asarray(feature["det/scores"].float_list.value, np.float32)
  return {"key": key, "image": decode_jpeg(get_bytes("image/encoded")),
          "text": get_bytes("text").decode("utf-8"), "labels": labels, "depth_scale": depth_scale}
