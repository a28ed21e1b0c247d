"""Where a run's files live: a local path, or an object-store URL (`gs://bucket/run1`, or any
other fsspec protocol whose package is installed). The trainer, the loader, the metrics writer
and the checkpointer do their file work through these functions and never branch on the scheme.

Local paths go through `os` (atomic writes through `atomic_files`, `os.pread` for random reads).
URLs go through fsspec (gcsfs for `gs://`), which needs no TensorFlow, so grain's worker
processes read shards from a bucket as they read them from disk. An object store has no
directories, no append and no rename: writing an object replaces it whole (atomic by itself),
`makedirs` does nothing, and `move` copies, then deletes. Orbax reaches the same bucket through
etils.epath (on fsspec as well: tools/train.py sets EPATH_USE_TF=false) and TensorStore.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import threading
from typing import Iterable

from clipzoo_jax import atomic_files
from clipzoo_jax import cli


class StorageError(cli.UserError):
  """A URL whose scheme is unknown or whose package is missing, or a bucket that is not there."""


def is_url(path) -> bool:
  """Whether `path` names an object-store location (`scheme://...`) rather than a local path."""
  return "://" in str(path)


def _filesystem(path: str):
  """(fsspec file system, the path as it names it) of a URL; one line naming the URL if the
  scheme is unknown or its package (gcsfs for gs://) is not installed."""
  import fsspec  # pylint: disable=import-outside-toplevel
  try:
    return fsspec.core.url_to_fs(path)
  except ImportError as error:
    raise StorageError(f"{path}: the {path.split('://')[0]}:// scheme needs a package that is not "
                       f"installed ({error}); gs:// needs gcsfs (requirements.txt)") from None
  except ValueError as error:
    raise StorageError(f"{path}: not a path this machine can read ({error}); use a local path "
                       "or gs://BUCKET/PATH") from None


def _url(filesystem, name: str) -> str:
  """The full URL of a name the file system returned (fsspec drops the scheme)."""
  return filesystem.unstrip_protocol(name)


def bucket_of(url: str) -> str:
  """`gs://bucket` of `gs://bucket/some/path`."""
  scheme, rest = url.split("://", 1)
  return f"{scheme}://{rest.split('/', 1)[0]}"


def bucket_problem(path: str) -> str | None:
  """Why the bucket of URL `path` cannot be used (missing, not listable), for an error message
  about a missing file; None for a local path or a bucket that is there."""
  if not is_url(path):
    return None
  filesystem, _ = _filesystem(path)
  bucket = bucket_of(path)
  try:
    filesystem.ls(bucket.split("://", 1)[1])
  except FileNotFoundError:
    return f"the bucket {bucket} does not exist"
  except Exception as error:  # noqa: BLE001  (no permission, no credentials: say so)
    first_line = next(iter(str(error).strip().splitlines()), "")
    return f"the bucket {bucket} cannot be listed ({type(error).__name__}: {first_line})"
  return None


# ---------------------------------------------------------------------------------------------
# Names.


def join(base: str, *parts: str) -> str:
  if is_url(base):
    scheme, rest = str(base).split("://", 1)
    return f"{scheme}://{posixpath.join(rest, *parts)}"
  return os.path.join(base, *parts)


def absolute(path: str) -> str:
  """A local path made absolute; a URL as it is (without a trailing slash)."""
  if is_url(path):
    return str(path).rstrip("/")
  return os.path.abspath(path)


def basename(path: str) -> str:
  return posixpath.basename(str(path).rstrip("/")) if is_url(path) else os.path.basename(path)


def dirname(path: str) -> str:
  return posixpath.dirname(str(path).rstrip("/")) if is_url(path) else os.path.dirname(path)


# ---------------------------------------------------------------------------------------------
# Questions.


def exists(path: str) -> bool:
  if not is_url(path):
    return os.path.exists(path)
  filesystem, name = _filesystem(path)
  return filesystem.exists(name)


def isdir(path: str) -> bool:
  """A local directory, or a URL prefix that holds at least one object."""
  if not is_url(path):
    return os.path.isdir(path)
  filesystem, name = _filesystem(path)
  return filesystem.isdir(name)


def glob(pattern: str) -> list[str]:
  """Paths matching `pattern` (`*` within one level), sorted."""
  if not is_url(pattern):
    import glob as glob_lib  # pylint: disable=import-outside-toplevel
    return sorted(glob_lib.glob(pattern))
  filesystem, name = _filesystem(pattern)
  return sorted(_url(filesystem, found) for found in filesystem.glob(name))


# ---------------------------------------------------------------------------------------------
# Reading and writing whole files.


def open_file(path: str, mode: str = "r", **kwargs):
  """`open()` for a local path or a URL (text or binary, read or write)."""
  if not is_url(path):
    return open(path, mode, **kwargs)  # pylint: disable=unspecified-encoding
  filesystem, name = _filesystem(path)
  return filesystem.open(name, mode, **kwargs)


def read_bytes(path: str) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` so readers see the old file or the new one, never a part of it:
  a temporary file renamed locally, one object upload on a store."""
  if not is_url(path):
    atomic_files.write_bytes(path, data)
    return
  filesystem, name = _filesystem(path)
  filesystem.pipe_file(name, data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def makedirs(path: str) -> None:
  """Creates a local directory (and its parents); nothing to do on an object store."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  if not is_url(path):
    os.remove(path)
    return
  filesystem, name = _filesystem(path)
  filesystem.rm_file(name)


def move_tree(source: str, target: str) -> None:
  """Moves a directory (every object under a prefix) to a path that does not exist yet."""
  if not is_url(source):
    shutil.move(source, target)
    return
  filesystem, name = _filesystem(source)
  _, target_name = _filesystem(target)
  filesystem.copy(name, target_name, recursive=True)
  filesystem.rm(name, recursive=True)


def upload_tree(local_dir: str, target: str, last: Iterable[str] = ()) -> None:
  """Copies every file under `local_dir` to `target` (a URL or a local path), the names in
  `last` after all others: a manifest written last marks the copy complete."""
  last = set(last)
  files = []
  for root, _, names in os.walk(local_dir):
    files += [os.path.relpath(os.path.join(root, name), local_dir) for name in names]
  for relative in sorted(files, key=lambda f: (f in last, f)):
    source, destination = os.path.join(local_dir, relative), join(target, *relative.split(os.sep))
    if is_url(destination):
      filesystem, name = _filesystem(destination)
      filesystem.put_file(source, name)  # streamed: shards may be large
    else:
      os.makedirs(os.path.dirname(destination), exist_ok=True)
      shutil.copyfile(source, destination)


# ---------------------------------------------------------------------------------------------
# Random reads.


class RangeReader:
  """`read(offset, size)` of one file, from many threads at once: `os.pread` on a local file
  (no shared file position), one ranged GET per call on an object store (its size asked once,
  so no range starts past the end). Pickles without an open file or connection, so each of
  grain's worker processes opens its own."""

  def __init__(self, path: str):
    self.path = path
    self._lock = threading.Lock()
    self._fd = None
    self._remote = None  # (file system, name, size)

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])

  def read(self, offset: int, size: int) -> bytes:
    """Up to `size` bytes from `offset`; fewer where the file ends first."""
    if not is_url(self.path):
      return os.pread(self._local(), size, offset)
    filesystem, name, file_size = self._object()
    end = min(offset + size, file_size)
    return filesystem.cat_file(name, start=offset, end=end) if offset < end else b""

  def _local(self) -> int:
    if self._fd is None:
      with self._lock:
        if self._fd is None:
          self._fd = os.open(self.path, os.O_RDONLY)
    return self._fd

  def _object(self):
    if self._remote is None:
      filesystem, name = _filesystem(self.path)
      self._remote = (filesystem, name, int(filesystem.size(name)))
    return self._remote

  def close(self) -> None:
    with self._lock:
      if self._fd is not None:
        os.close(self._fd)
      self._fd, self._remote = None, None
