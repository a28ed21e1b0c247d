"""Readers of raw image-text corpora: webdataset / img2dataset tars, CSV/TSV + image files, TFDS.

A corpus has a fixed key order and plans it into `Slice`s (deterministic, contiguous ranges of
that order); the pseudo-labelling job writes one output shard per slice. Readers yield the
encoded image bytes untouched (decoding happens in the job) and never raise on a bad pair: a
missing image or caption comes back as an `Item` with `None` and, where known, a `problem`.
"""

from __future__ import annotations

import abc
import csv
import dataclasses
import glob
import inspect
import json
import os
import posixpath
import re
import tarfile
from typing import Iterator, Mapping, Sequence

from clipzoo_jax import cli
from clipzoo_jax.pseudo_label import report

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt",)


class CorpusError(cli.UserError):
  """The corpus config does not match the data; the message names the file, field and values."""


@dataclasses.dataclass
class Item:
  """One raw pair. `image` is the encoded file as stored in the source; None when missing."""
  key: str
  image: bytes | None
  caption: str | None
  problem: str | None = None  # why the pair is unusable, when the reader already knows


@dataclasses.dataclass(frozen=True)
class Slice:
  """Items [start, stop) of one source file / split in key order; None bounds = the whole source."""
  source: str
  start: int | None = None
  stop: int | None = None

  @property
  def count(self) -> int | None:
    return None if self.stop is None else self.stop - (self.start or 0)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, obj: Mapping) -> "Slice":
    return cls(**obj)


def check_unique_keys(keys: Sequence[tuple[str, str]], where: str, hint: str) -> None:
  """Raises CorpusError when a key occurs twice in (source, key) pairs: records are identified by
  key (resume, --verify, training), so a repeat would otherwise fail only after the whole job."""
  first: dict[str, str] = {}
  repeats = []
  for source, key in keys:
    if key in first:
      repeats.append((key, first[key], source))
    else:
      first[key] = source
  if repeats:
    key, a, b = repeats[0]
    raise CorpusError(f"{where}: {len(repeats)} keys occur more than once, e.g. key {key!r} in "
                      f"{a} and in {b}; keys must be unique. {hint}")


def ranges(total: int, records_per_shard: int) -> list[tuple[int, int]]:
  return [(start, min(start + records_per_shard, total)) for start in range(0, total, records_per_shard)]


class Corpus(abc.ABC):
  """A corpus: `describe()` (JSON-able identity), `plan()` (its slices), `read(slice)` (its items)."""

  @abc.abstractmethod
  def describe(self) -> dict:
    ...

  @abc.abstractmethod
  def plan(self) -> list[Slice]:
    ...

  @abc.abstractmethod
  def read(self, part: Slice) -> Iterator[Item]:
    ...


# ---------------------------------------------------------------------------------------------
# webdataset / img2dataset tars


def expand_braces(pattern: str) -> list[str]:
  """Brace expansion as in webdataset: `a/{000..002}.tar` (zero-padded ranges), `{x,y}`."""
  match = re.search(r"\{([^{}]*)\}", pattern)
  if not match:
    return [pattern]
  body = match.group(1)
  numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if numeric:
    first, last = numeric.groups()
    width = len(first) if first.startswith("0") and len(first) > 1 else 0
    options = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
  else:
    options = body.split(",")
  expanded = []
  for option in options:
    expanded.extend(expand_braces(pattern[:match.start()] + option + pattern[match.end():]))
  return expanded


def tar_paths(pattern: str) -> list[str]:
  """The tar files of a brace / glob pattern, in pattern order (globs sorted); all must exist."""
  paths = []
  for expanded in expand_braces(pattern):
    paths.extend(sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded])
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise CorpusError(f"corpus pattern {pattern!r}: {len(missing)} of {len(paths)} tar files do not "
                      f"exist, e.g. {missing[:3]}")
  if not paths:
    raise CorpusError(f"corpus pattern {pattern!r} matches no files")
  return paths


def _member_key(name: str) -> tuple[str, str]:
  """webdataset convention: key = path up to the first dot of the basename; extension = the rest."""
  dirname, basename = posixpath.split(name)
  stem, _, extension = basename.partition(".")
  return posixpath.join(dirname, stem), extension.lower()


def _member_groups(tar: tarfile.TarFile) -> Iterator[tuple[str, dict]]:
  """(key, {extension: member}) for consecutive members sharing a key; data is not read."""
  key, group = None, {}
  for member in tar:
    if not member.isfile() or posixpath.basename(member.name).startswith("."):
      continue
    member_key, extension = _member_key(member.name)
    if member_key != key and key is not None:
      yield key, group
      group = {}
    key = member_key
    group[extension] = member
  if key is not None:
    yield key, group


def _caption_from(tar: tarfile.TarFile, group: dict) -> tuple[str | None, str | None]:
  """(caption, problem): the .txt member, else the `caption` field of the .json member."""
  for extension in CAPTION_EXTENSIONS:
    if extension in group:
      data = tar.extractfile(group[extension]).read()
      try:
        return data.decode("utf-8").strip(), None
      except UnicodeDecodeError:
        return None, f"caption .{extension} is not UTF-8"
  if "json" in group:
    try:
      caption = json.loads(tar.extractfile(group["json"]).read()).get("caption")
    except (ValueError, AttributeError):
      return None, None
    return (caption.strip(), None) if isinstance(caption, str) else (None, None)
  return None, None


def _tar_item(tar: tarfile.TarFile, key: str, group: dict) -> Item:
  caption, problem = _caption_from(tar, group)
  image_extension = next((e for e in IMAGE_EXTENSIONS if e in group), None)
  if image_extension is None:
    found = ", ".join("." + e for e in sorted(group)) or "nothing"
    return Item(key, None, caption, f"missing image: no {'/'.join(IMAGE_EXTENSIONS)} member, "
                                    f"found {found}")
  return Item(key, tar.extractfile(group[image_extension]).read(), caption, problem)


class TarCorpus(Corpus):
  """webdataset / img2dataset shards: members `<key>.jpg` + `<key>.txt` [+ `<key>.json`].

  Planning scans the tars (headers only) once per job, to refuse keys that repeat across tars
  (two img2dataset outputs both start at 000000000) before anything is labelled;
  `key_by_source=True` names keys `<tar path>/<key>` (relative to the tars' common folder) so
  such corpora combine. One slice per tar, or with `records_per_shard` slices of that many pairs,
  so a few huge tars still spread over many workers.
  """

  def __init__(self, pattern: str, records_per_shard: int | None = None,
               key_by_source: bool = False):
    self.pattern, self.records_per_shard = pattern, records_per_shard
    self.key_by_source = bool(key_by_source)
    self.paths = tar_paths(pattern)
    common = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in self.paths])
    self._prefix = {p: os.path.splitext(os.path.relpath(os.path.abspath(p), common))[0] + "/"
                    for p in self.paths} if self.key_by_source else {}

  def describe(self) -> dict:
    return {"kind": "tar", "pattern": self.pattern, "num_files": len(self.paths),
            "records_per_shard": self.records_per_shard, "key_by_source": self.key_by_source}

  def plan(self) -> list[Slice]:
    keys = {path: self.keys(path) for path in self.paths}
    check_unique_keys([(path, key) for path in self.paths for key in keys[path]],
                      f"corpus pattern {self.pattern!r}",
                      "Set --config.corpus.key_by_source=True to name keys <tar>/<key> (e.g. for "
                      "two img2dataset outputs that both start at 000000000), or deduplicate.")
    if self.records_per_shard is None:
      return [Slice(path) for path in self.paths]
    return [Slice(path, start, stop) for path in self.paths
            for start, stop in ranges(len(keys[path]), self.records_per_shard)]

  def keys(self, path: str) -> list[str]:
    """The keys of one tar in order; of a truncated tar, those before the damage (`read` reports
    the rest as one problem item)."""
    keys = []
    try:
      with tarfile.open(path, "r:*") as tar:
        for key, _ in _member_groups(tar):
          keys.append(self._prefix.get(path, "") + key)
    except (tarfile.TarError, OSError, EOFError):
      pass
    return keys

  def count(self, path: str) -> int:
    return len(self.keys(path))

  def read(self, part: Slice) -> Iterator[Item]:
    start, stop = part.start or 0, part.stop
    last_key = None
    try:
      with tarfile.open(part.source, "r:*") as tar:
        for index, (key, group) in enumerate(_member_groups(tar)):
          if stop is not None and index >= stop:
            return
          if index >= start:
            last_key = self._prefix.get(part.source, "") + key
            yield _tar_item(tar, last_key, group)
    except (tarfile.TarError, OSError, EOFError) as e:
      # A truncated or corrupt tar: its remaining keys are unknown, so report the file itself.
      yield Item(f"{part.source}#after:{last_key}", None, None,
                 f"unreadable tar: {part.source} after key {last_key!r}: {report.describe(e)}")


# ---------------------------------------------------------------------------------------------
# CSV / TSV of image paths and captions


class CsvCorpus(Corpus):
  """A CSV/TSV with an image path column (absolute, or relative to the csv's directory) and a
  caption column; columns by header name, or by 0-based index when `has_header` is False.
  Keys come from `key_column`, else `<csv stem>-<row number>`."""

  def __init__(self, path: str, image_column: str | int = "image",
               caption_column: str | int = "caption", key_column: str | int | None = None,
               delimiter: str | None = None, has_header: bool = True,
               records_per_shard: int = 10000):
    if not os.path.isfile(path):
      raise CorpusError(f"corpus csv {path!r} does not exist")
    self.path, self.has_header = path, has_header
    self.delimiter = delimiter or ("\t" if path.endswith((".tsv", ".tsv.txt")) else ",")
    self.columns = {"image_column": image_column, "caption_column": caption_column,
                    "key_column": key_column}
    self.records_per_shard = int(records_per_shard)
    self._rows: list[tuple[str, str, str]] | None = None

  def describe(self) -> dict:
    return {"kind": "csv", "path": self.path, "delimiter": self.delimiter,
            "has_header": self.has_header, "records_per_shard": self.records_per_shard,
            **self.columns}

  def rows(self) -> list[tuple[str, str, str]]:
    """(key, image path, caption) per data row, read once."""
    if self._rows is None:
      with open(self.path, newline="", encoding="utf-8") as f:
        self._rows = list(self._parse(csv.reader(f, delimiter=self.delimiter)))
    return self._rows

  def _parse(self, reader) -> Iterator[tuple[str, str, str]]:
    header = next(reader, []) if self.has_header else []
    index = {name: self._column_index(header, value) for name, value in self.columns.items()
             if value is not None}
    stem = os.path.splitext(os.path.basename(self.path))[0]
    for row_number, row in enumerate(reader):
      cell = lambda name: row[index[name]] if index[name] < len(row) else ""
      key = cell("key_column") if "key_column" in index else f"{stem}-{row_number:09d}"
      yield key, cell("image_column"), cell("caption_column")

  def _column_index(self, header: Sequence[str], column: str | int) -> int:
    if isinstance(column, str) and column.isdigit() and not self.has_header:
      column = int(column)  # from the command line, where every column is a string
    if isinstance(column, int):
      return column
    if column not in header:
      raise CorpusError(f"corpus csv {self.path!r}: column {column!r} not in the header; "
                        f"found columns {list(header)}")
    return list(header).index(column)

  def plan(self) -> list[Slice]:
    rows = self.rows()
    check_unique_keys([(f"row {i + 1}", key) for i, (key, _, _) in enumerate(rows)],
                      f"corpus csv {self.path!r} (key_column {self.columns['key_column']!r})",
                      "Fix that column, or leave config.corpus.key_column empty for row-number keys.")
    return [Slice(self.path, start, stop) for start, stop in ranges(len(rows),
                                                                   self.records_per_shard)]

  def read(self, part: Slice) -> Iterator[Item]:
    directory = os.path.dirname(os.path.abspath(self.path))
    for key, image_path, caption in self.rows()[part.start:part.stop]:
      full = os.path.join(directory, image_path)  # join keeps absolute paths as they are
      if not image_path:
        yield Item(key, None, caption, "missing image: empty image path")
        continue
      try:
        with open(full, "rb") as f:
          image = f.read()
      except OSError as e:
        yield Item(key, None, caption, f"missing image: cannot read {full}: {e.strerror}")
        continue
      yield Item(key, image, caption.strip() or None)


# ---------------------------------------------------------------------------------------------
# TFDS datasets (already prepared in a data_dir; nothing is downloaded)


def _nested(example: Mapping, path: str):
  """`captions/text` -> example['captions']['text']; a sequence gives its first element."""
  value = example
  for part in path.split("/"):
    value = value[part]
  if hasattr(value, "ndim") and value.ndim > 0:
    value = value[0] if len(value) else None
  return value


class TfdsCorpus(Corpus):
  """A TFDS dataset by name (or a prepared dataset directory) and split. Images are read
  undecoded (`SkipDecoding`), so JPEG sources stay byte-identical; keys are TFDS ids."""

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
               image_key: str = "image", caption_key: str = "caption",
               records_per_shard: int = 10000):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.image_key, self.caption_key = image_key, caption_key
    self.records_per_shard = int(records_per_shard)
    self._builder = None

  def describe(self) -> dict:
    return {"kind": "tfds", "name": self.name, "split": self.split, "data_dir": self.data_dir,
            "image_key": self.image_key, "caption_key": self.caption_key,
            "records_per_shard": self.records_per_shard}

  @property
  def builder(self):
    if self._builder is None:
      import tensorflow_datasets as tfds
      if os.path.isdir(self.name):
        self._builder = tfds.builder_from_directory(self.name)
      else:
        self._builder = tfds.builder(self.name, data_dir=self.data_dir)
      if self.split not in self._builder.info.splits:
        raise CorpusError(f"corpus tfds {self.name!r}: split {self.split!r} not found; found "
                          f"{sorted(self._builder.info.splits)}")
    return self._builder

  def plan(self) -> list[Slice]:
    total = self.builder.info.splits[self.split].num_examples
    return [Slice(self.split, start, stop) for start, stop in ranges(total, self.records_per_shard)]

  def read(self, part: Slice) -> Iterator[Item]:
    import tensorflow_datasets as tfds
    dataset = self.builder.as_dataset(
        split=f"{part.source}[{part.start}:{part.stop}]", shuffle_files=False,
        decoders={self.image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(add_tfds_id=True))
    for example in tfds.as_numpy(dataset):
      key = example["tfds_id"].decode("utf-8")
      image = _nested(example, self.image_key)
      caption = _nested(example, self.caption_key)
      caption = caption.decode("utf-8", errors="replace").strip() if caption is not None else None
      yield Item(key, bytes(image) if image is not None and len(image) else None, caption or None)


# ---------------------------------------------------------------------------------------------
# Construction from configs and command-line specs

_KINDS = {"tar": TarCorpus, "csv": CsvCorpus, "tfds": TfdsCorpus}


def reader_options(kind: str) -> tuple[str, ...]:
  """The config fields a reader kind takes (its constructor's arguments)."""
  return tuple(inspect.signature(_KINDS[kind]).parameters)


def make_corpus(config: Mapping) -> Corpus:
  """A corpus from a config: `kind` (tar, csv, tsv, tfds) plus reader arguments. A config may hold
  the options of every kind (so each can be set from the command line); only those of `kind`
  apply, and None, "" and a 0 records_per_shard mean the reader's default."""
  config = {k: v for k, v in dict(config).items() if v is not None and v != ""}
  if not config.get("records_per_shard", 1):
    config.pop("records_per_shard")
  kind = config.pop("kind", None)
  if kind == "tsv":
    kind, config["delimiter"] = "csv", config.get("delimiter", "\t")
  if kind not in _KINDS:
    raise CorpusError(f"corpus.kind: expected one of {sorted(_KINDS) + ['tsv']}, found {kind!r}")
  known = {name for other in _KINDS for name in reader_options(other)}
  unknown = sorted(set(config) - known)
  if unknown:
    raise CorpusError(f"corpus: unknown fields {unknown}; expected some of {sorted(known)}")
  return _KINDS[kind](**{k: v for k, v in config.items() if k in reader_options(kind)})


def parse_spec(spec: str) -> dict:
  """Command-line shorthand -> config: `tar:PATTERN`, `csv:PATH`, `tsv:PATH`, `tfds:NAME/SPLIT`;
  without a prefix the kind follows the file name (.tar / .csv / .tsv)."""
  kind, sep, location = spec.partition(":")
  if not sep or kind not in ("tar", "csv", "tsv", "tfds"):
    kind, location = "", spec
    for suffix, guess in ((".tar", "tar"), (".csv", "csv"), (".tsv", "tsv")):
      if spec.endswith(suffix):
        kind = guess
    if not kind:
      raise CorpusError(f"--corpus {spec!r}: expected tar:PATTERN, csv:PATH, tsv:PATH or "
                        "tfds:NAME/SPLIT")
  if kind == "tfds":
    name, _, split = location.rpartition("/")
    return {"kind": "tfds", "name": name or split, "split": split if name else "train"}
  return {"kind": kind, ("pattern" if kind == "tar" else "path"): location}
