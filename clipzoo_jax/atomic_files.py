"""Files that are either absent or complete: written under a temporary name, then renamed.

A reader (another worker, a resumed job, a later run) never sees half a file: it finds the old
content or the new one. The temporary file lies beside the target, so `os.replace` never crosses a
file system, and its name holds the process and thread id, so concurrent writers never share one.
Every temporary name contains `TEMP_MARKER`, so cleanup code can tell a killed writer's debris
(see `data.shards.remove_partial`). A writer that streams a large file itself (a TFRecord shard)
writes to `temp_path(path)` and renames it when it is done.
"""

from __future__ import annotations

import json
import os
import threading

TEMP_MARKER = ".tmp-"


def temp_path(path: str) -> str:
  """The temporary name beside `path` that this process and thread write before renaming."""
  return f"{path}{TEMP_MARKER}{os.getpid()}-{threading.get_ident()}"


def is_temp(name: str) -> bool:
  """Whether a file name is a temporary file of some writer (perhaps one that was killed)."""
  return TEMP_MARKER in name


def publish(temporary: str, path: str) -> None:
  """Renames a finished temporary file to `path`, its data on disk (fsync) before the rename, so
  `path` is either absent, the old file or the complete new one."""
  descriptor = os.open(temporary, os.O_RDONLY)
  try:
    os.fsync(descriptor)
  finally:
    os.close(descriptor)
  os.replace(temporary, path)


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically."""
  tmp = temp_path(path)
  with open(tmp, "wb") as f:
    f.write(data)
  publish(tmp, path)


def write_text(path: str, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj, **json_kwargs) -> None:
  """Writes `json.dumps(obj, **json_kwargs)` to `path` atomically, without a trailing newline.

  The object is encoded before the file is opened, so an object JSON cannot encode leaves no file.
  """
  write_text(path, json.dumps(obj, **json_kwargs))
