"""Reading PyTorch weight files without executing code, and writing safetensors one tensor piece
at a time (so an export never holds a second full copy of the weights).

Readers: safetensors (one file or an HF `*.safetensors.index.json`), `torch.save` pickles (zip or
legacy) through `torch.load(weights_only=True)`, and TorchScript archives (OpenAI's `ViT-B-16.pt`)
through a restricted unpickler that only rebuilds tensors: `torch.jit.load` would run the archive's
code, and `torch.load(weights_only=True)` refuses TorchScript.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickle
import struct
import zipfile
from typing import Callable, Iterable, Mapping

import numpy as np

from clipzoo_jax import atomic_files
from clipzoo_jax.convert.errors import ConversionError
from clipzoo_jax.convert.errors import reading

SAFETENSORS = "safetensors file"
TORCH_FILE = "PyTorch file (torch.save or TorchScript)"


class TensorFileError(ConversionError):
  """A weight file cannot be read; the message names the file and what was found."""


class TensorSource:
  """Named tensors read on demand as float32 NumPy: `names()`, `shape(name)`, `get(name)`.

  `metadata` holds the non-tensor scalars found beside the tensors (e.g. OpenAI's
  `input_resolution`). `origin` names the file(s) in error messages.
  """

  def __init__(self, shapes: Mapping[str, tuple], fetch: Callable[[str], np.ndarray],
               origin: str, metadata: Mapping | None = None, keys: Mapping[str, str] | None = None):
    self._shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
    self._fetch = fetch
    self._keys = dict(keys) if keys is not None else {name: name for name in shapes}
    self.origin = origin
    self.metadata = dict(metadata or {})

  def names(self) -> list[str]:
    return list(self._keys)

  def shape(self, name: str) -> tuple:
    return self._shapes[self._keys[name]]

  def get(self, name: str) -> np.ndarray:
    with reading(self.origin, f"tensor {name!r}", TensorFileError):
      return np.asarray(self._fetch(self._keys[name]), np.float32, order="C")

  def renamed(self, rename: Callable[[str], str]) -> "TensorSource":
    """The same tensors under new names (e.g. a `module.` prefix stripped)."""
    keys = {}
    for name, key in self._keys.items():
      new = rename(name)
      if new in keys:
        raise TensorFileError(f"{self.origin}: {name!r} and another tensor both map to {new!r}")
      keys[new] = key
    return TensorSource(self._shapes, self._fetch, self.origin, self.metadata, keys)


def _to_numpy(value) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  import torch  # pylint: disable=import-outside-toplevel
  return value.detach().to(torch.float32).numpy()


def array_source(arrays: Mapping, origin: str, metadata: Mapping | None = None) -> TensorSource:
  """A source over in-memory tensors (torch.Tensor or NumPy)."""
  arrays = dict(arrays)
  return TensorSource({name: tuple(value.shape) for name, value in arrays.items()},
                      lambda name: _to_numpy(arrays[name]), origin, metadata)


# ---------------------------------------------------------------------------------------------
# safetensors


def safetensors_source(paths: Iterable[str], origin: str | None = None) -> TensorSource:
  """Lazy reader over one or several safetensors files (any dtype, bf16 included, via torch)."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  paths = list(paths)
  where, shapes = {}, {}
  for path in paths:
    if not os.path.isfile(path):
      raise TensorFileError(f"{origin or path}: weight file {path} does not exist")
    with reading(path, SAFETENSORS, TensorFileError), safe_open(path, framework="pt") as f:
      for name in f.keys():
        if name in where:
          raise TensorFileError(f"{path}: tensor {name!r} is also in {where[name]}")
        where[name] = path
        shapes[name] = tuple(f.get_slice(name).get_shape())

  def fetch(name):
    with safe_open(where[name], framework="pt") as f:
      return _to_numpy(f.get_tensor(name))

  return TensorSource(shapes, fetch, origin or ", ".join(paths))


def index_files(index_path: str) -> list[str]:
  """The shard files named by an HF `*.index.json` weight map, in first-use order."""
  with reading(index_path, "JSON file", TensorFileError), open(index_path, encoding="utf-8") as f:
    index = json.load(f)
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not weight_map or not all(
      isinstance(name, str) for name in weight_map.values()):
    raise TensorFileError(f"{index_path}: expected an object with a non-empty 'weight_map' of "
                          f"tensor name -> file name, found {_excerpt(index)}")
  folder = os.path.dirname(index_path)
  files = [os.path.join(folder, name) for name in dict.fromkeys(weight_map.values())]
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:
    raise TensorFileError(f"{index_path}: names weight files that do not exist: {missing}")
  return files


def _excerpt(value, limit: int = 80) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "..."


class SafetensorsWriter:
  """Writes a safetensors file whose tensor names and shapes are known up front; tensor data (or
  a contiguous slot of it along axis 0) may arrive in any order. Commits atomically on close.
  """

  def __init__(self, path: str, shapes: Mapping[str, tuple],
               metadata: Mapping[str, str] | None = None):
    self.path = path
    self._shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
    header, offset, self._offsets = {}, 0, {}
    for name, shape in self._shapes.items():
      size = 4 * math.prod(shape)
      header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
      self._offsets[name] = offset
      offset += size
    if metadata:
      header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it
    self._data_start = 8 + len(text)
    self._written = collections.defaultdict(set)
    self._num_slots = {}
    self._tmp = atomic_files.temp_path(path)
    self._file = open(self._tmp, "wb")
    self._file.write(struct.pack("<Q", len(text)) + text)
    self._file.truncate(self._data_start + offset)

  def write(self, name: str, array: np.ndarray, slot: int = 0, num_slots: int = 1) -> None:
    """Stores `array` as slot `slot` of `num_slots` equal parts (along axis 0) of tensor `name`."""
    if name not in self._shapes:
      raise TensorFileError(f"{self.path}: no tensor {name!r} was declared")
    shape = self._shapes[name]
    part = (shape[0] // num_slots,) + shape[1:] if num_slots > 1 else shape
    if tuple(array.shape) != part:
      raise TensorFileError(f"{self.path}: tensor {name!r} slot {slot}/{num_slots}: expected shape "
                            f"{part}, found {tuple(array.shape)}")
    if slot in self._written[name]:
      raise TensorFileError(f"{self.path}: tensor {name!r} slot {slot} written twice")
    data = np.asarray(array, "<f4", order="C")
    self._file.seek(self._data_start + self._offsets[name] + slot * data.nbytes)
    self._file.write(memoryview(data).cast("B"))
    self._written[name].add(slot)
    self._num_slots[name] = num_slots

  def close(self) -> None:
    """Checks every tensor was written completely, then renames the file into place."""
    self._file.close()
    incomplete = [name for name in self._shapes
                  if len(self._written.get(name, ())) != self._num_slots.get(name, -1)]
    if incomplete:
      os.remove(self._tmp)
      raise TensorFileError(f"{self.path}: tensors never (fully) written: {incomplete}")
    atomic_files.publish(self._tmp, self.path)

  def abort(self) -> None:
    if not self._file.closed:
      self._file.close()
    if os.path.exists(self._tmp):
      os.remove(self._tmp)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    if exc_type is None:
      self.close()
    else:
      self.abort()


# ---------------------------------------------------------------------------------------------
# PyTorch pickles and TorchScript archives


def _zip_prefix(names: list[str]) -> str:
  data_pkl = [n for n in names if n.endswith("data.pkl")]
  return data_pkl[0][:-len("data.pkl")] if data_pkl else ""


def is_torchscript(path: str) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
  prefix = _zip_prefix(names)
  return any(n.startswith(prefix + "code/") for n in names) or prefix + "constants.pkl" in names


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "ByteStorage": np.uint8, "CharStorage": np.int8,
    "BoolStorage": np.bool_,
}


class _ScriptObject:
  """Stand-in for a TorchScript class instance: keeps only its attribute dict."""
  state: dict = {}  # replaced by __setstate__; an object pickled without state has none

  def __init__(self, *_):
    self.state = {}

  def __setstate__(self, state):
    self.state = state if isinstance(state, dict) else {}


def _storage_array(raw: bytes, dtype) -> np.ndarray:
  if dtype == "bfloat16":  # bf16 is the top half of a float32
    return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
  return np.frombuffer(raw, np.dtype(dtype).newbyteorder("<"))


class _RestrictedUnpickler(pickle.Unpickler):
  """Rebuilds tensors as NumPy arrays; any global other than tensor/storage plumbing and
  TorchScript class names (replaced by `_ScriptObject`) is refused."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, origin: str):
    super().__init__(file)
    self._archive, self._prefix, self._origin = archive, prefix, origin

  def find_class(self, module, name):
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch" and name in _STORAGE_DTYPES:
      return _STORAGE_DTYPES[name]
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module.startswith("__torch__"):
      return _ScriptObject
    raise TensorFileError(f"{self._origin}: refusing global {module}.{name} in a "
                                 "TorchScript archive (only tensors are read)")

  def persistent_load(self, pid):
    kind, dtype, key = pid[0], pid[1], pid[2]
    if kind != "storage":
      raise TensorFileError(f"{self._origin}: unknown persistent id {pid!r}")
    return _storage_array(self._archive.read(f"{self._prefix}data/{key}"), dtype)


def _rebuild_tensor(storage, offset, size, stride, *_):
  if not size:
    return np.array(storage[offset])
  item = storage.itemsize
  return np.lib.stride_tricks.as_strided(storage[offset:], tuple(size),
                                         tuple(s * item for s in stride))


def _walk_script(obj, prefix: str, tensors: dict, scalars: dict) -> None:
  for key, value in obj.state.items():
    name = f"{prefix}{key}"
    if isinstance(value, _ScriptObject):
      _walk_script(value, name + ".", tensors, scalars)
    elif isinstance(value, np.ndarray):
      tensors[name] = value
    elif isinstance(value, int) and not isinstance(value, bool):
      scalars[name] = value


def read_torchscript(path: str) -> TensorSource:
  """Every tensor attribute of a TorchScript archive's module tree, by dotted name."""
  with reading(path, "TorchScript archive", TensorFileError), zipfile.ZipFile(path) as archive:
    prefix = _zip_prefix(archive.namelist())
    with archive.open(prefix + "data.pkl") as f:
      root = _RestrictedUnpickler(f, archive, prefix, path).load()
  if not isinstance(root, _ScriptObject):
    raise TensorFileError(f"{path}: TorchScript archive without a module at its root")
  tensors, scalars = {}, {}
  _walk_script(root, "", tensors, scalars)
  return array_source(tensors, path, scalars)


def read_torch_pickle(path: str) -> TensorSource:
  """A `torch.save`d state dict, loaded with weights_only=True; a `{'state_dict': ...}` wrapper
  (training checkpoints) is unwrapped; non-tensor scalars go to `metadata`."""
  import torch  # pylint: disable=import-outside-toplevel
  hint = ("truncated or corrupt? only plain state dicts are read, with "
          "torch.load(weights_only=True), never pickled code")
  with reading(path, TORCH_FILE, TensorFileError, hint):
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise TensorFileError(f"{path}: expected a state dict (a mapping of names to tensors), "
                          f"found {type(obj).__name__}")
  tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
  scalars = {k: v for k, v in obj.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
  return array_source(tensors, path, scalars)


def is_safetensors(path: str) -> bool:
  """A safetensors file starts with its header length (8 bytes) and then the JSON header."""
  with open(path, "rb") as f:
    start = f.read(9)
  return len(start) == 9 and start[8:9] == b"{"


def read_tensor_file(path: str) -> TensorSource:
  """Any supported weight file by its content: safetensors (or its index), TorchScript, pickle.
  A file that cannot be read raises TensorFileError naming it, whatever the way it is broken."""
  if not os.path.isfile(path):
    raise TensorFileError(f"{path}: no such file")
  if os.path.getsize(path) == 0:
    raise TensorFileError(f"{path}: empty file (0 bytes); expected a safetensors or PyTorch "
                          "weight file (an interrupted download or copy?)")
  if path.endswith(".index.json"):
    files = index_files(path)
    if all(f.endswith(".safetensors") for f in files):
      return safetensors_source(files, path)
    sources = [read_tensor_file(f) for f in files]
    return array_source({n: s.get(n) for s in sources for n in s.names()}, path)
  if path.endswith(".safetensors") or is_safetensors(path):
    return safetensors_source([path])
  with reading(path, TORCH_FILE, TensorFileError):
    torchscript = is_torchscript(path)
  return read_torchscript(path) if torchscript else read_torch_pickle(path)
