"""A Hugging Face model + processor loaded from a local folder or hub id, run batched on GPU or CPU.

Images are preprocessed one at a time (thread-safe, in the job's decode pool) and batched by
input shape: processors that keep the aspect ratio give images of different sizes different
shapes, and running each at its own shape (no padding) gives exactly the single-image result.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from clipzoo_jax.experts import base
from clipzoo_jax.experts.base import ExpertError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".msgpack", ".h5")
DTYPES = ("float32", "bfloat16", "float16")
# Model config, processor config and tokenizer files: they change labels as much as the weights.
CONFIG_SUFFIXES = (".json", ".txt", ".model")


def files_sha256(paths: Sequence[str]) -> str:
  """One digest over several files: sha256 of 'name sha256' lines, sorted by name."""
  from clipzoo_jax.data.shards import file_sha256
  lines = sorted(f"{os.path.basename(p)} {file_sha256(p)}\n" for p in paths)
  return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def local_folder(source: str) -> str:
  """The folder holding `source`: itself when a directory, else the hub cache snapshot."""
  if os.path.isdir(source):
    return source
  try:
    import huggingface_hub
    return huggingface_hub.snapshot_download(source, local_files_only=True)
  except Exception as e:
    raise ExpertError(f"expert source {source!r}: not a directory and not in the Hugging Face "
                      f"cache ({type(e).__name__}); download it or point `source` at a folder") from e


def folder_weights_sha256(source: str) -> str:
  folder = local_folder(source)
  paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(WEIGHT_SUFFIXES)]
  if not paths:
    raise ExpertError(f"expert source {source!r}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) "
                      f"in {folder}")
  return files_sha256(paths)


def folder_config_sha256(source: str) -> str:
  """Checksum of the folder's config files (config.json, preprocessor_config.json, tokenizer...)."""
  folder = local_folder(source)
  paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder))
           if n.endswith(CONFIG_SUFFIXES) and os.path.isfile(os.path.join(folder, n))]
  return files_sha256(paths)


def pick_device(device: str = "auto"):
  """'auto' = the GPU of this process (LOCAL_RANK when several share a host) if any, else CPU."""
  import torch
  if device != "auto":
    return torch.device(device)
  if torch.cuda.is_available():
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
  return torch.device("cpu")


def autocast(device, dtype: str):
  """Mixed precision for the forward pass; float32 means none."""
  import torch
  if dtype not in DTYPES:
    raise ExpertError(f"expert dtype: expected one of {list(DTYPES)}, found {dtype!r}")
  if dtype == "float32":
    return contextlib.nullcontext()
  return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def _float32_outputs(outputs):
  """Post-processors interpolate and softmax: give them float32 even after a bf16 forward pass."""
  for name, value in list(outputs.items()):
    if hasattr(value, "is_floating_point") and value.is_floating_point():
      outputs[name] = value.float()
  return outputs


def _shape_key(inputs: Mapping[str, Any]) -> tuple:
  return tuple((name, tuple(value.shape)) for name, value in sorted(inputs.items()))


class HFModel:
  """Model + processor with `preprocess(image)` and `forward(prepared)` grouped by input shape."""

  def __init__(self, source: str, load_model: Callable[[str], Any],
               load_processor: Callable[..., Any], device: str = "auto", dtype: str = "float32",
               processor_kwargs: Mapping | None = None, call_kwargs: Mapping | None = None):
    import torch
    self.source = source
    self.device = pick_device(device)
    self.dtype = dtype
    autocast(self.device, dtype)  # validates dtype before loading anything large
    try:
      self.processor = load_processor(source, **dict(processor_kwargs or {}))
      self.model = load_model(source).eval().to(self.device)
    except (OSError, ValueError) as e:
      raise ExpertError(f"expert source {source!r}: cannot load model/processor: {e}") from e
    self.config = self.model.config
    self.call_kwargs = dict(call_kwargs or {})
    self.processor_kwargs = dict(processor_kwargs or {})
    self._torch = torch
    self._weights_sha256 = None

  def preprocess(self, image: np.ndarray) -> dict:
    # Decoded images are always (H, W, 3): saying so stops the processor from guessing, which
    # reads a 3xW or 1xW image as channels-first (a wrong picture, or "mean must have 1 elements").
    features = self.processor(images=[image], return_tensors="pt",
                              input_data_format="channels_last", **self.call_kwargs)
    return {name: value for name, value in features.items() if hasattr(value, "shape")}

  def forward(self, prepared: Sequence[Mapping]) -> Iterator[tuple[list[int], Any]]:
    """Yields (indices into `prepared`, model outputs) per group of equal input shapes."""
    groups: dict[tuple, list[int]] = {}
    for i, inputs in enumerate(prepared):
      groups.setdefault(_shape_key(inputs), []).append(i)
    torch = self._torch
    for indices in groups.values():
      inputs = {name: torch.cat([prepared[i][name] for i in indices]).to(self.device)
                for name in prepared[indices[0]]}
      with torch.inference_mode(), autocast(self.device, self.dtype):
        outputs = self.model(**inputs)
      yield indices, _float32_outputs(outputs)

  def class_names(self) -> tuple[str, ...]:
    """Class names by id from the model config; ids missing from id2label get a placeholder."""
    id2label = {int(k): v for k, v in (self.config.id2label or {}).items()}
    if not id2label:
      raise ExpertError(f"expert source {self.source!r}: model config has no id2label")
    return tuple(id2label.get(i, f"unused_{i}") for i in range(max(id2label) + 1))

  def weights_sha256(self) -> str:
    if self._weights_sha256 is None:  # hashing multi-GB weights once is enough
      self._weights_sha256 = folder_weights_sha256(self.source)
    return self._weights_sha256

  def settings(self) -> dict:
    """What besides the weights changes this model's labels (the device does not, by design)."""
    return {"dtype": self.dtype, "config_sha256": folder_config_sha256(self.source),
            "processor_kwargs": self.processor_kwargs, "call_kwargs": self.call_kwargs}


class HFExpert(base.Expert):
  """An expert backed by one Hugging Face model (`self.model`, an HFModel): per-image preprocessing
  in the job's decode threads, weights checksum from the model's files."""
  model: HFModel

  def prepare(self, image: np.ndarray, key: str) -> dict:
    return self.model.preprocess(image)

  def weights_sha256(self) -> str:
    return self.model.weights_sha256()

  def manifest_entry(self) -> dict:
    entry = super().manifest_entry()
    entry["expert"].update(self.model.settings())
    return entry
