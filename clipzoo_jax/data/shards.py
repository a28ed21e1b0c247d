"""Shard files and the manifest: atomic TFRecord shard writes and the `manifest.json` beside them.

A shard is written to a temporary name and renamed only when complete, together with a small
`<shard>.json` sidecar (record count, sha256, keys digest). A shard without its sidecar is never
complete. The manifest is assembled from the sidecars, so any number of workers can write
disjoint shards and one of them (or a later `finalize`) writes the manifest.
Each shard also gets `<shard>.index`: little-endian int64 byte offsets of its records, for
random access by later readers (e.g. grain).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Iterable, Mapping, Sequence

import numpy as np

from clipzoo_jax import atomic_files
from clipzoo_jax import storage
from clipzoo_jax.data import records

MANIFEST_NAME = "manifest.json"
_TFRECORD_OVERHEAD = 16  # uint64 length + uint32 length crc + uint32 data crc


class ManifestError(ValueError):
  """A shard directory does not match its manifest; the message names the file and the field."""


def shard_name(prefix: str, index: int, count: int) -> str:
  return f"{prefix}-{index:05d}-of-{count:05d}.tfrecord"


@dataclasses.dataclass
class ShardInfo:
  path: str            # file name relative to the dataset directory
  num_records: int
  sha256: str
  keys_sha256: str     # digest of the sorted keys: cheap exact-once checks across shards

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _keys_digest(keys: Iterable[str]) -> str:
  digest = hashlib.sha256()
  for key in sorted(keys):
    digest.update(key.encode("utf-8") + b"\n")
  return digest.hexdigest()


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def sidecar_path(shard_path: str) -> str:
  return shard_path + ".json"


def index_path(shard_path: str) -> str:
  return shard_path + ".index"


def is_complete(shard_path: str) -> bool:
  """A shard is complete when its sidecar exists (written after the shard's atomic rename)."""
  return os.path.exists(shard_path) and os.path.exists(sidecar_path(shard_path))


class ShardWriter:
  """Writes serialized examples to one shard, atomically.

  Usage: `with ShardWriter(path) as w: w.write(key, serialized)`. On clean exit the temporary
  file is renamed to `path` and the sidecar written; on error the temporary file is removed and
  nothing at `path` changes. Duplicate keys inside one shard are an error.
  """

  def __init__(self, path: str):
    self.path = path
    self._tmp = atomic_files.temp_path(path)
    self._writer = None
    self._keys: list[str] = []
    self._seen: set[str] = set()
    self._offsets: list[int] = []
    self._offset = 0

  def __enter__(self) -> "ShardWriter":
    import tensorflow as tf
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    self._writer = tf.io.TFRecordWriter(self._tmp)
    return self

  def write(self, key: str, serialized: bytes) -> None:
    if key in self._seen:
      raise records.RecordError(f"{self.path}: key {key!r} written twice to the same shard")
    self._seen.add(key)
    self._keys.append(key)
    self._offsets.append(self._offset)
    self._offset += len(serialized) + _TFRECORD_OVERHEAD
    self._writer.write(serialized)

  def __exit__(self, exc_type, exc, tb) -> None:
    self._writer.close()
    if exc_type is not None:
      if os.path.exists(self._tmp):
        os.remove(self._tmp)
      return
    atomic_files.write_bytes(index_path(self.path), np.asarray(self._offsets, "<i8").tobytes())
    atomic_files.publish(self._tmp, self.path)
    info = ShardInfo(path=os.path.basename(self.path), num_records=len(self._keys),
                     sha256=file_sha256(self.path), keys_sha256=_keys_digest(self._keys))
    atomic_files.write_json(sidecar_path(self.path), info.to_json(), indent=1)
    self.info = info

  @property
  def num_records(self) -> int:
    return len(self._keys)


def read_shard_info(shard_path: str) -> ShardInfo:
  with open(sidecar_path(shard_path)) as f:
    return ShardInfo(**json.load(f))


def remove_partial(directory: str, names: Iterable[str] | None = None) -> list[str]:
  """Deletes temporary files and shards without sidecars left by a killed writer; returns them.

  `names` (shard file names) limits the cleanup to those shards' files, so one worker never
  deletes the temporary file another worker is writing in the same directory.
  """
  owned = None if names is None else tuple(names)
  removed = []
  for name in sorted(os.listdir(directory)):
    if owned is not None and not name.startswith(owned):
      continue
    path = os.path.join(directory, name)
    partial = atomic_files.is_temp(name) or (name.endswith(".tfrecord") and not is_complete(path))
    if partial:
      os.remove(path)
      removed.append(name)
  return removed


def write_manifest(directory: str, tasks: Mapping[str, Mapping], shard_paths: Sequence[str],
                   command: str, extra: Mapping | None = None) -> dict:
  """Assembles `manifest.json` from the shards' sidecars. Every shard must be complete.

  tasks: per task, a dict with at least `expert` (name, source, weights_sha256) and, where it
  applies, `classes`, `label_resolution`, `depth_kind` ("metric" or "inverse").
  """
  infos = []
  for path in shard_paths:
    full = os.path.join(directory, os.path.basename(path))
    if not is_complete(full):
      raise ManifestError(f"{full}: shard is not complete (no sidecar {sidecar_path(full)}); "
                          "rerun the job that writes it before writing the manifest")
    infos.append(read_shard_info(full))
  unknown = sorted(set(tasks) - set(records.TASKS))
  if unknown:
    raise ManifestError(f"manifest tasks {unknown} are not in the schema; expected a subset of "
                        f"{list(records.TASKS)}")
  manifest = {
      "schema_version": records.SCHEMA_VERSION,
      "tasks": {name: dict(spec) for name, spec in tasks.items()},
      "num_records": sum(info.num_records for info in infos),
      "shards": [info.to_json() for info in infos],
      "command": command,
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  if extra:
    manifest.update(extra)
  atomic_files.write_json(os.path.join(directory, MANIFEST_NAME), manifest, indent=1)
  return manifest


def read_manifest(directory: str) -> dict:
  """The manifest of a dataset directory, local or in a bucket (`storage`)."""
  path = storage.join(directory, MANIFEST_NAME)
  if not storage.exists(path):
    raise ManifestError(f"{path}: {storage.bucket_problem(path) or 'no manifest'}; a dataset "
                        "directory needs the manifest.json written when all its shards are "
                        "complete")
  manifest = json.loads(storage.read_text(path))
  version = manifest.get("schema_version")
  if version != records.SCHEMA_VERSION:
    raise ManifestError(f"{path}: schema_version expected {records.SCHEMA_VERSION}, "
                        f"found {version!r}")
  return manifest


def shard_paths(directory: str, manifest: dict | None = None) -> list[str]:
  manifest = manifest or read_manifest(directory)
  return [storage.join(directory, shard["path"]) for shard in manifest["shards"]]


def verify(directory: str) -> list[str]:
  """Checks every shard against the manifest: existence, sha256, record counts, unique keys.

  Returns a list of problems (empty when the directory is exactly what the manifest says).
  """
  import tensorflow as tf

  manifest = read_manifest(directory)
  problems = []
  seen_keys: dict[str, str] = {}
  total = 0
  for shard in manifest["shards"]:
    path = os.path.join(directory, shard["path"])
    if not os.path.exists(path):
      problems.append(f"{path}: listed in the manifest but missing")
      continue
    found = file_sha256(path)
    if found != shard["sha256"]:
      problems.append(f"{path}: sha256 expected {shard['sha256']}, found {found}")
    count = 0
    for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
      example = tf.train.Example.FromString(serialized)
      key = example.features.feature["key"].bytes_list.value[0].decode("utf-8")
      if key in seen_keys:
        problems.append(f"{path}: key {key!r} also in {seen_keys[key]}")
      seen_keys[key] = shard["path"]
      count += 1
    if count != shard["num_records"]:
      problems.append(f"{path}: num_records expected {shard['num_records']}, found {count}")
    total += count
  if total != manifest["num_records"]:
    problems.append(f"{directory}: manifest num_records {manifest['num_records']}, found {total}")
  return problems
