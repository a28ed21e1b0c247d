"""Random access to the records of TFRecord shards through their `<shard>.index` byte offsets.

A `ShardRecords` is the grain data source of one shard directory: `len()` records in manifest
order, `records[i]` reads one record with a seek and two reads and checks its length and data
CRCs, so a reader can start anywhere in constant time. A record that cannot be read (a truncated
shard, a broken checksum) comes back as a `BadRecord` naming the shard and its position, which the
loader skips and counts instead of stopping.

Shards without an index (written by other tools) are scanned once when the source is built.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import google_crc32c
import numpy as np

from clipzoo_jax import cli
from clipzoo_jax.data import shards

_HEADER = 12  # uint64 length + uint32 masked crc of the length
_FOOTER = 4   # uint32 masked crc of the data


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """A record that could not be read or decoded: where it is and why."""
  shard: str
  key: str
  reason: str

  def describe(self) -> str:
    return f"{self.shard}: record {self.key!r}: {self.reason}"


def masked_crc(data: bytes) -> int:
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def scan_offsets(path: str) -> np.ndarray:
  """Byte offsets of every record of a TFRecord file, read from the headers (no index file)."""
  offsets = []
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    position = 0
    while position + _HEADER <= size:
      f.seek(position)
      (length,) = struct.unpack("<Q", f.read(8))
      if position + _HEADER + length + _FOOTER > size:
        break  # a truncated tail: the index ends at the last whole record
      offsets.append(position)
      position += _HEADER + length + _FOOTER
  return np.asarray(offsets, np.int64)


def read_offsets(shard_path: str, num_records: int) -> np.ndarray:
  """The shard's record offsets from its index, or from a scan when it has none.

  Raises cli.UserError when the index does not list `num_records` offsets (the manifest's count).
  """
  index = shards.index_path(shard_path)
  if os.path.exists(index):
    offsets = np.fromfile(index, dtype="<i8")
    where = index
  else:
    offsets = scan_offsets(shard_path)
    where = f"{shard_path} (scanned: no {os.path.basename(index)})"
  if len(offsets) != num_records:
    raise cli.UserError(f"{where}: {len(offsets)} record offsets, but the manifest says the shard "
                        f"has {num_records} records")
  return offsets.astype(np.int64)


class ShardRecords:
  """The records of a shard directory in manifest order, by index (a grain random-access source).

  Items are `(shard name, serialized record)` or a `BadRecord`. Pickles without open files, so
  grain's worker processes each open their own.
  """

  def __init__(self, directory: str, manifest: dict | None = None):
    self.directory = directory
    manifest = manifest or shards.read_manifest(directory)
    self.paths = shards.shard_paths(directory, manifest)
    counts = [int(entry["num_records"]) for entry in manifest["shards"]]
    if not self.paths or sum(counts) == 0:
      raise cli.UserError(f"{directory}: the manifest lists no records")
    self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self._offsets = [read_offsets(p, n) for p, n in zip(self.paths, counts)]
    self._files: dict[int, int] = {}

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_files"] = {}
    return state

  def __repr__(self) -> str:
    return f"ShardRecords({self.directory!r}, {len(self)} records)"

  def locate(self, index: int) -> tuple[int, int]:
    """(shard number, record number in the shard) of the record at manifest position `index`."""
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} of {self.directory} (it has {len(self)})")
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    return shard, int(index - self._starts[shard])

  def _fd(self, shard: int) -> int:
    """The shard's file descriptor. Reads use os.pread (no shared file position), so grain's
    reader threads can read one shard at the same time."""
    if shard not in self._files:
      fd = os.open(self.paths[shard], os.O_RDONLY)
      if self._files.setdefault(shard, fd) != fd:  # another thread opened it first
        os.close(fd)
    return self._files[shard]

  def __getitem__(self, index: int):
    shard, position = self.locate(int(index))
    name = os.path.basename(self.paths[shard])
    where = f"<record {position} of the shard>"
    fd, offset = self._fd(shard), int(self._offsets[shard][position])
    header = os.pread(fd, _HEADER, offset)
    if len(header) < _HEADER:
      return BadRecord(self.paths[shard], where, "the shard ends before the record (truncated)")
    length, length_crc = struct.unpack("<QI", header)
    if masked_crc(header[:8]) != length_crc:
      return BadRecord(self.paths[shard], where, "the record's length checksum does not match")
    data = os.pread(fd, length + _FOOTER, offset + _HEADER)
    if len(data) < length + _FOOTER:
      return BadRecord(self.paths[shard], where,
                       f"the shard ends inside the record ({len(data)} of {length + _FOOTER} bytes; "
                       "truncated)")
    (data_crc,) = struct.unpack("<I", data[length:])
    if masked_crc(data[:length]) != data_crc:
      return BadRecord(self.paths[shard], where, "the record's data checksum does not match")
    return name, data[:length]

  def close(self) -> None:
    for fd in self._files.values():
      os.close(fd)
    self._files = {}
