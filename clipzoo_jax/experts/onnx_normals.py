"""Surface-normals expert for networks exported to ONNX (DSINE, Omnidata, ...), run by onnxruntime.

Preprocessing is declared in the config (input size, mean/std, value range) because an ONNX file
does not carry it. Output normals are converted to the schema's camera frame (x right, y down,
z forward) by per-axis signs, resized valid-aware to the label resolution, and re-normalized.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image

from clipzoo_jax.data import records
from clipzoo_jax.experts import base, resize
from clipzoo_jax.experts.hf_model import files_sha256

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess_image(image: np.ndarray, size: tuple[int, int] | None, mean, std,
                     size_multiple: int = 1) -> np.ndarray:
  """(H, W, 3) uint8 -> (3, h, w) float32: bilinear resize, scale to [0, 1], normalize.

  Without a fixed `size`, the image keeps its size rounded down to a multiple of `size_multiple`.
  """
  height, width = image.shape[:2]
  if size is None:
    size = (max(size_multiple, height // size_multiple * size_multiple),
            max(size_multiple, width // size_multiple * size_multiple))
  if tuple(size) != (height, width):
    image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
  pixels = image.astype(np.float32) / 255.0
  pixels = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def external_data_files(path: str) -> list[str]:
  """Files holding the weights of an ONNX model saved with external data (models over 2 GB)."""
  import onnx
  from onnx import external_data_helper
  model = onnx.load(path, load_external_data=False)
  names = set()
  for tensor in model.graph.initializer:
    if external_data_helper.uses_external_data(tensor):
      names.add(external_data_helper.ExternalDataInfo(tensor).location)
  return [os.path.join(os.path.dirname(path), name) for name in sorted(names)]


def onnx_providers(device: str) -> list[str]:
  import onnxruntime
  available = onnxruntime.get_available_providers()
  if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]
  return ["CPUExecutionProvider"]


@base.register("onnx_normals")
class OnnxNormalsExpert(base.Expert):
  """Normals from an ONNX network taking (N, 3, h, w) and giving (N, 3, h', w') (or NHWC)."""
  kind = "onnx_normals"

  def __init__(self, task: str, source: str, device: str = "auto",
               input_size: Sequence[int] | None = None, size_multiple: int = 1,
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
               output_index: int = 0, output_layout: str = "NCHW",
               axis_signs: Sequence[float] = (1.0, 1.0, 1.0), label_scale: float = 1.0,
               label_max_side: int | None = None):
    import onnxruntime
    if not os.path.isfile(source):
      raise base.ExpertError(f"experts.{task}.source: ONNX file {source!r} does not exist")
    if output_layout not in ("NCHW", "NHWC"):
      raise base.ExpertError(f"experts.{task}.output_layout: expected 'NCHW' or 'NHWC', "
                             f"found {output_layout!r}")
    self.task, self.source = task, source
    self.input_size = None if input_size is None else tuple(int(s) for s in input_size)
    self.size_multiple, self.mean, self.std = int(size_multiple), tuple(mean), tuple(std)
    self.output_index, self.output_layout = int(output_index), output_layout
    self.axis_signs = np.asarray(axis_signs, np.float32)
    self.resolution = base.resolution_from(label_scale, label_max_side)
    self.session = onnxruntime.InferenceSession(source, providers=onnx_providers(device))
    self.input_name = self.session.get_inputs()[0].name

  def prepare(self, image: np.ndarray, key: str) -> np.ndarray:
    return preprocess_image(image, self.input_size, self.mean, self.std, self.size_multiple)

  def run(self, prepared: Sequence[np.ndarray], batch: base.Batch) -> list[records.Labels]:
    groups: dict[tuple, list[int]] = {}
    for i, pixels in enumerate(prepared):
      groups.setdefault(pixels.shape, []).append(i)
    labels: list[records.Labels | None] = [None] * len(batch)
    for indices in groups.values():
      inputs = np.stack([prepared[i] for i in indices])
      outputs = self.session.run(None, {self.input_name: inputs})[self.output_index]
      for i, normals in zip(indices, outputs):
        labels[i] = records.Labels(normals=self._to_labels(normals, batch.images[i]))
    return labels

  def _to_labels(self, normals: np.ndarray, image: np.ndarray) -> np.ndarray:
    normals = normals.transpose(1, 2, 0) if self.output_layout == "NCHW" else normals
    return resize.resize_normals(normals * self.axis_signs, self.label_size(image))

  def weights_sha256(self) -> str:
    return files_sha256([self.source] + external_data_files(self.source))

  def manifest_entry(self) -> dict:
    entry = super().manifest_entry()
    entry["axis_signs"] = self.axis_signs.tolist()
    entry["preprocessing"] = {"input_size": self.input_size, "size_multiple": self.size_multiple,
                              "mean": list(self.mean), "std": list(self.std)}
    entry["output"] = {"index": self.output_index, "layout": self.output_layout}
    return entry
