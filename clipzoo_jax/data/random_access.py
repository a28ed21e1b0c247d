"""Random access to the records of TFRecord shards through their `<shard>.index` byte offsets.

A `ShardRecords` is the grain data source of one shard directory, on local disk or in a bucket
(`storage`): `len()` records in manifest order, `records[i]` reads one record (header, data and
footer in one read, since the next record's offset bounds it; the last record of a shard takes
two) and checks its length and data CRCs, so a reader can start anywhere in constant time. A
record that cannot be read (a truncated shard, a broken checksum) comes back as a `BadRecord`
naming the shard and its position, which the loader skips and counts instead of stopping.

Shards without an index (written by other tools) are scanned once when the source is built.
"""

from __future__ import annotations

import dataclasses
import itertools
import struct
from typing import Iterator

import google_crc32c
import numpy as np

from clipzoo_jax import cli
from clipzoo_jax import storage
from clipzoo_jax.data import records, shards

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


def _record_length(header: bytes) -> int | str:
  """The data length a record's header gives, or why the header cannot be read."""
  if len(header) < _HEADER:
    return "the shard ends before the record (truncated)"
  length, length_crc = struct.unpack("<QI", header)
  if masked_crc(header[:8]) != length_crc:
    return "the record's length checksum does not match"
  return length


def _record_data(length: int, data: bytes) -> bytes | str:
  """The record's data from the bytes after its header (data and footer), or why not."""
  if len(data) < length + _FOOTER:
    return (f"the shard ends inside the record ({len(data)} of {length + _FOOTER} bytes; "
            "truncated)")
  (data_crc,) = struct.unpack("<I", data[length:length + _FOOTER])
  if masked_crc(data[:length]) != data_crc:
    return "the record's data checksum does not match"
  return data[:length]


def read_in_order(path: str) -> Iterator[bytes]:
  """The records of one shard from its start, read as a stream (on a bucket: a request per
  buffered block, not per record); a damaged record ends it with a RecordError naming it."""
  with storage.open_file(path, "rb") as f:
    for position in itertools.count():
      header = f.read(_HEADER)
      if not header:
        return
      length = _record_length(header)
      record = length if isinstance(length, str) else _record_data(length, f.read(length + _FOOTER))
      if isinstance(record, str):
        raise records.RecordError(f"{path}: record {position}: {record}")
      yield record


def scan_offsets(path: str) -> np.ndarray:
  """Byte offsets of every record of a TFRecord file, read from the headers (no index file)."""
  offsets = []
  with storage.open_file(path, "rb") as f:
    size = f.seek(0, 2)
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
  if storage.exists(index):
    offsets = np.frombuffer(storage.read_bytes(index), dtype="<i8")
    where = index
  else:
    offsets = scan_offsets(shard_path)
    where = f"{shard_path} (scanned: no {storage.basename(index)})"
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
    # Bytes from a record to the next one (header, data, footer); unknown for a shard's last.
    self._spans = [np.diff(offsets) for offsets in self._offsets]
    self._readers = [storage.RangeReader(path) for path in self.paths]

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __repr__(self) -> str:
    return f"ShardRecords({self.directory!r}, {len(self)} records)"

  def locate(self, index: int) -> tuple[int, int]:
    """(shard number, record number in the shard) of the record at manifest position `index`."""
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} of {self.directory} (it has {len(self)})")
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    return shard, int(index - self._starts[shard])

  def __getitem__(self, index: int):
    shard, position = self.locate(int(index))
    where = f"<record {position} of the shard>"
    reader, offset = self._readers[shard], int(self._offsets[shard][position])
    spans = self._spans[shard]
    span = max(int(spans[position]), _HEADER) if position < len(spans) else _HEADER
    first = reader.read(offset, span)
    length = _record_length(first[:_HEADER])
    if isinstance(length, str):
      return BadRecord(self.paths[shard], where, length)
    data = first[_HEADER:_HEADER + length + _FOOTER]
    if len(data) < length + _FOOTER:  # the shard's last record, or a shorter read
      data = reader.read(offset + _HEADER, length + _FOOTER)
    record = _record_data(length, data)
    if isinstance(record, str):
      return BadRecord(self.paths[shard], where, record)
    return storage.basename(self.paths[shard]), record

  def close(self) -> None:
    for reader in self._readers:
      reader.close()
