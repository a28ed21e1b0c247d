"""Joint image + label augmentation in NumPy and Pillow, for the grain loader's worker processes.

The same geometry as the TF ops of `augment.py` (which the evaluators' tf.data preprocessing
uses): one normalized crop window (y0, x0, h, w) snapped to whole image pixels and one flip per
record, applied to the image and to every dense label at its own resolution, so labels stored at a
lower resolution than the image are cropped at exactly the same place. Dense labels are
resampled nearest (a class id or an invalid 0 is never blended); the image is cropped and resized
by Pillow's bilinear filter (antialiased when shrinking, as CLIP's own preprocessing) and stays
uint8: CLIP normalization happens on the device (`models.clip.normalize_pixels`).

Randomness comes from a NumPy generator per example, seeded from (seed, position in the stream):
a restarted pipeline augments the same example the same way, whatever worker it lands on.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from clipzoo_jax import cli

_CROP_ATTEMPTS = 10
_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
  """Sizes and ranges of the joint augmentation; the loader fills this from the data config."""
  image_size: int
  label_size: int
  max_boxes: int = 16
  crop_scale: tuple[float, float] = (0.5, 1.0)   # crop area as a fraction of the image area
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop width / height, in pixels
  flip_probability: float = 0.5
  min_box_area_fraction: float = 0.25
  antialias: bool = False  # bilinear with a wider kernel when the crop is shrunk (PIL-like)

  def __post_init__(self):
    lo, hi = self.crop_scale
    if not 0 < lo <= hi <= 1:
      raise cli.UserError(f"crop_scale expected 0 < low <= high <= 1, found {self.crop_scale}")
    lo, hi = self.crop_ratio
    if not 0 < lo <= hi:
      raise cli.UserError(f"crop_ratio expected 0 < low <= high, found {self.crop_ratio}")
    if not 0 <= self.flip_probability <= 1:
      raise cli.UserError(f"flip_probability expected in [0, 1], found {self.flip_probability}")
    for name in ("image_size", "label_size", "max_boxes"):
      if getattr(self, name) <= 0:
        raise cli.UserError(f"{name} expected > 0, found {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------
# Options from the data config.


def field(config, name: str, default=_REQUIRED):
  """A data-config field from a dict or an ml_collections ConfigDict."""
  value = config.get(name, None) if hasattr(config, "get") else getattr(config, name, None)
  if value is None:
    if default is _REQUIRED:
      raise cli.UserError(f"data config: field {name!r} is required; found fields "
                       f"{sorted(config.keys()) if hasattr(config, 'keys') else config}")
    return default
  return value


def _pair(config, name: str, default) -> tuple[float, float]:
  value = tuple(float(v) for v in field(config, name, default))
  if len(value) != 2:
    raise cli.UserError(f"data config: field {name!r} expected (low, high), found {value}")
  return value


def augment_options(config) -> AugmentOptions:
  image_size = int(field(config, "image_size"))
  return AugmentOptions(
      image_size=image_size,
      label_size=int(field(config, "label_size", image_size)),
      max_boxes=int(field(config, "max_boxes", 16)),
      crop_scale=_pair(config, "crop_scale", (0.5, 1.0)),
      crop_ratio=_pair(config, "crop_ratio", (3 / 4, 4 / 3)),
      flip_probability=float(field(config, "flip_probability", 0.5)),
      min_box_area_fraction=float(field(config, "min_box_area_fraction", 0.25)),
      antialias=bool(field(config, "antialias", False)))




def example_rng(*seed_words: int) -> np.random.Generator:
  return np.random.Generator(np.random.Philox(np.random.SeedSequence(
      [int(w) % 2**64 for w in seed_words])))


# ---------------------------------------------------------------------------------------------
# Windows and flips.


def random_crop_window(rng: np.random.Generator, image_hw, scale, ratio) -> np.ndarray:
  """Random-resized-crop window (y0, x0, h, w), normalized, as torchvision samples it: the first
  of 10 (area, aspect) draws that fits, else the largest central window with the aspect clamped."""
  height, width = float(image_hw[0]), float(image_hw[1])
  area = rng.uniform(scale[0], scale[1], _CROP_ATTEMPTS)
  aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), _CROP_ATTEMPTS))
  offset = rng.uniform(size=2)
  crop_w = np.sqrt(area * aspect * height / width)
  crop_h = np.sqrt(area / aspect * width / height)
  fits = np.flatnonzero((crop_w <= 1.0) & (crop_h <= 1.0))
  if fits.size:
    h, w = crop_h[fits[0]], crop_w[fits[0]]
  else:
    image_aspect = width / height
    h, w = min(1.0, image_aspect / ratio[0]), min(1.0, ratio[1] / image_aspect)
    offset = np.array([0.5, 0.5])
  return np.array([offset[0] * (1.0 - h), offset[1] * (1.0 - w), h, w])


def central_crop_window(image_hw) -> np.ndarray:
  """The largest central square (the eval view: resize the short side, crop the centre)."""
  height, width = float(image_hw[0]), float(image_hw[1])
  side = min(height, width)
  h, w = side / height, side / width
  return np.array([(1.0 - h) / 2, (1.0 - w) / 2, h, w])


def pixel_box(window, image_hw) -> tuple[int, int, int, int]:
  """The window rounded to whole image pixels: (y0, x0, h, w), at least 1 px, inside the image."""
  height, width = int(image_hw[0]), int(image_hw[1])
  y0, x0, h, w = (int(v) for v in np.round(np.asarray(window) * [height, width, height, width]))
  h, w = min(max(h, 1), height), min(max(w, 1), width)
  return min(max(y0, 0), height - h), min(max(x0, 0), width - w), h, w


def snap_window(window, image_hw) -> np.ndarray:
  height, width = int(image_hw[0]), int(image_hw[1])
  return np.asarray(pixel_box(window, image_hw), np.float64) / [height, width, height, width]


def sample_window_and_flip(rng, image_hw, options, train: bool) -> tuple[np.ndarray, bool]:
  """(window, flip) of one example: random when training, central and unflipped for eval."""
  if not train:
    return snap_window(central_crop_window(image_hw), image_hw), False
  window = random_crop_window(rng, image_hw, options.crop_scale, options.crop_ratio)
  flip = bool(rng.uniform() < options.flip_probability)
  return snap_window(window, image_hw), flip


# ---------------------------------------------------------------------------------------------
# Resampling.


def nearest_indices(start: float, extent: float, out_size: int, in_size: int) -> np.ndarray:
  """Source pixels sampled by `out_size` output pixels at their centres (half-pixel convention)."""
  # float32, in the TF twin's order of operations: the same source pixel at exact ties
  centres = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) / np.float32(out_size)
  coords = (np.float32(start) + centres * np.float32(extent)) * np.float32(in_size)
  return np.clip(np.floor(coords).astype(np.int64), 0, in_size - 1)


def crop_resize_nearest(label: np.ndarray, window, size: int, flip: bool = False) -> np.ndarray:
  """Nearest crop+resize (+ mirror) of a (H, W, ...) label to (size, size, ...)."""
  rows = nearest_indices(window[0], window[2], size, label.shape[0])
  cols = nearest_indices(window[1], window[3], size, label.shape[1])
  if flip:
    cols = cols[::-1]
  return label[rows[:, None], cols[None, :]]


def crop_resize_image(image: Image.Image, window, size: int, flip: bool) -> np.ndarray:
  """uint8 (size, size, 3) of the window's pixel slice, Pillow bilinear, mirrored when `flip`."""
  y0, x0, h, w = pixel_box(window, (image.height, image.width))
  # crop, then resize: the filter clamps at the slice's edges, as the TF twin does
  resized = image.crop((x0, y0, x0 + w, y0 + h)).resize((size, size), Image.Resampling.BILINEAR)
  if flip:
    resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(resized, np.uint8)


def color_jitter(pixels: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
  """Brightness, contrast and saturation each scaled by a factor in [1 - s, 1 + s], random order
  (torchvision's ColorJitter without hue), on a uint8 image; returns uint8."""
  x = pixels.astype(np.float32)
  factors = rng.uniform(1.0 - strength, 1.0 + strength, 3)
  for op in rng.permutation(3):
    if op == 0:
      x = x * factors[0]
    elif op == 1:
      mean = (x @ np.array([0.299, 0.587, 0.114], np.float32)).mean()
      x = (x - mean) * factors[1] + mean
    else:
      grey = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
      x = (x - grey) * factors[2] + grey
    x = np.clip(x, 0.0, 255.0)
  return np.rint(x).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Per-kind label transforms.


def unit_normals(normals: np.ndarray) -> np.ndarray:
  norm = np.linalg.norm(normals, axis=-1, keepdims=True)
  return np.where(norm > 1e-6, normals / np.maximum(norm, 1e-6), 0.0).astype(np.float32)


def mirror_normals(normals: np.ndarray, flip: bool) -> np.ndarray:
  """A left-right flip negates the camera-frame x component (x points right)."""
  return normals * np.array([-1.0, 1.0, 1.0], np.float32) if flip else normals


def box_area(boxes: np.ndarray) -> np.ndarray:
  return (np.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
          * np.maximum(boxes[..., 3] - boxes[..., 1], 0.0))


def crop_boxes(boxes: np.ndarray, window, min_area_fraction: float):
  """Boxes (N, 4) ymin,xmin,ymax,xmax into the window's frame, clipped to [0, 1], and a keep mask:
  a box stays when at least `min_area_fraction` of its visible area is inside the window."""
  y0, x0, h, w = (float(v) for v in window)
  visible = np.clip(boxes, 0.0, 1.0)
  lower = np.array([y0, x0, y0, x0], np.float32)
  upper = np.array([y0 + h, x0 + w, y0 + h, x0 + w], np.float32)
  inside = np.minimum(np.maximum(visible, lower), upper)
  area, inside_area = box_area(visible), box_area(inside)
  keep = ((inside[:, 2] > inside[:, 0]) & (inside[:, 3] > inside[:, 1])
          & (inside_area >= min_area_fraction * area) & (area > 0))
  cropped = (inside - lower) / np.array([h, w, h, w], np.float32)
  return np.clip(cropped, 0.0, 1.0).astype(np.float32), keep


def mirror_boxes(boxes: np.ndarray, flip: bool) -> np.ndarray:
  if not flip:
    return boxes
  ymin, xmin, ymax, xmax = boxes.T
  return np.stack([ymin, 1.0 - xmax, ymax, 1.0 - xmin], axis=-1)


def pad_boxes(boxes, classes, scores, keep, max_boxes: int):
  """Kept boxes, highest score first (ties keep record order), padded to `max_boxes`:
  float32 (max_boxes, 4) and int32 (max_boxes,) with class -1 marking padding."""
  boxes, classes, scores = boxes[keep], np.asarray(classes)[keep], np.asarray(scores)[keep]
  order = np.argsort(-scores, kind="stable")[:max_boxes]
  out_boxes = np.zeros((max_boxes, 4), np.float32)
  out_classes = np.full((max_boxes,), -1, np.int32)
  out_boxes[:len(order)] = boxes[order]
  out_classes[:len(order)] = classes[order]
  return out_boxes, out_classes


def augment_boxes(boxes, classes, scores, window, flip, options):
  cropped, keep = crop_boxes(np.asarray(boxes, np.float32).reshape(-1, 4), window,
                             options.min_box_area_fraction)
  return pad_boxes(mirror_boxes(cropped, flip), classes, scores, keep, options.max_boxes)


def check_label_shape(name: str, label_hw, image_hw) -> None:
  """A dense label may be stored at a lower (or higher) resolution than its image, but it must
  cover the same picture: its aspect ratio matches the image's to within one label pixel."""
  lh, lw = int(label_hw[0]), int(label_hw[1])
  ih, iw = int(image_hw[0]), int(image_hw[1])
  if lh < 1 or lw < 1 or abs(lw - lh * iw / ih) > 1.0 or abs(lh - lw * ih / iw) > 1.0:
    raise ValueError(f"{name} label is {lh}x{lw} but the image is {ih}x{iw}: expected the "
                     "image's aspect ratio at any resolution")


def decode_png(data: bytes, name: str, channels: int) -> np.ndarray:
  """A stored PNG label as an array: (H, W) for one channel, (H, W, 3) for three."""
  import io  # pylint: disable=import-outside-toplevel
  with Image.open(io.BytesIO(data)) as image:
    if image.format != "PNG":
      raise ValueError(f"{name} label is not a PNG (found {image.format})")
    pixels = np.asarray(image)
  if image.mode in ("I;16", "I;16B", "I"):
    pixels = pixels.astype(np.uint16)
  if pixels.ndim != (2 if channels == 1 else 3) or (channels == 3 and pixels.shape[-1] != 3):
    raise ValueError(f"{name} label has shape {pixels.shape}; expected "
                     f"{'(H, W)' if channels == 1 else '(H, W, 3)'}")
  return pixels
