"""The pseudo-labelling job's parts (corpus, experts, options) built from a config
(`configs/pseudo_label/*.py`, whose args parse with `clipzoo_jax.config_args`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from clipzoo_jax.experts import base
from clipzoo_jax.pseudo_label import corpus as corpus_lib
from clipzoo_jax.pseudo_label import job


# Every reader option of every corpus kind, with its default ("" and 0 mean the reader's default),
# so that each can be set from the command line: --config.corpus.image_column=filepath.
CORPUS_DEFAULTS = {
    "kind": "tar", "records_per_shard": 0,
    "pattern": "", "key_by_source": False,                                    # tar
    "path": "", "image_column": "image", "caption_column": "caption",          # csv, tsv
    "key_column": "", "delimiter": "", "has_header": True,
    "name": "", "split": "train", "data_dir": "", "image_key": "image",        # tfds
    "caption_key": "caption",
}


def corpus_config(**values) -> dict:
  """`config.corpus` with every field present: CORPUS_DEFAULTS updated by `values`."""
  unknown = sorted(set(values) - set(CORPUS_DEFAULTS))
  if unknown:
    raise corpus_lib.CorpusError(f"config.corpus: unknown fields {unknown}; expected some of "
                                 f"{sorted(CORPUS_DEFAULTS)}")
  return dict(CORPUS_DEFAULTS, **values)


@dataclasses.dataclass
class RayOptions:
  """How `tools/pseudo_label.py --runner=ray` sizes its shard workers (`config.ray`). Each worker
  holds every expert and labels one whole shard at a time."""
  num_workers: int = 0     # 0: as many as the cluster's GPUs (num_gpus > 0) or CPUs hold
  num_gpus: float = 0.0    # per worker; a fraction (0.5) puts several workers on one GPU
  num_cpus: float = 2.0    # per worker: its decode threads, expert calls and writer thread
  max_retries: int = 3     # restarts of a worker whose process died; each retries its shard

  def __post_init__(self):
    for name in ("num_workers", "num_gpus", "num_cpus", "max_retries"):
      if getattr(self, name) < 0:
        raise job.JobError(f"config.ray.{name}: expected >= 0, found {getattr(self, name)}")


def job_config(**values) -> dict:
  """`config.job` with every JobOptions field present, so each can be set from the command line."""
  return _dataclass_config(job.JobOptions, values)


def ray_config(**values) -> dict:
  """`config.ray` with every RayOptions field present."""
  return _dataclass_config(RayOptions, values)


def _dataclass_config(cls, values: Mapping) -> dict:
  fields = {name: field.default for name, field in cls.__dataclass_fields__.items()}
  return dict(fields, **values)


def job_options(config: ml_collections.ConfigDict) -> job.JobOptions:
  return _dataclass_options(job.JobOptions, config.get("job", {}), "config.job")


def ray_options(config: ml_collections.ConfigDict) -> RayOptions:
  return _dataclass_options(RayOptions, config.get("ray", {}), "config.ray")


def _dataclass_options(cls, section: Any, where: str):
  options = _plain(section)
  fields = set(cls.__dataclass_fields__)
  unknown = sorted(set(options) - fields)
  if unknown:
    raise ValueError(f"{where}: unknown fields {unknown}; expected some of {sorted(fields)}")
  return cls(**options)


def make_experts(config: ml_collections.ConfigDict) -> dict[str, base.Expert]:
  experts = {task: _plain(spec) for task, spec in config.experts.items()}
  if not experts:
    raise base.ExpertError("config.experts is empty; configure at least one task's expert")
  return base.build_experts(experts)


def make_corpus(config: ml_collections.ConfigDict, spec: str | None = None) -> corpus_lib.Corpus:
  """The corpus of `config.corpus`, with a `--corpus` shorthand (kind and location) applied on top."""
  corpus = _plain(config.get("corpus", {}))
  if spec:  # kind and location; the config's other fields (e.g. image_column) still apply
    corpus.update(corpus_lib.parse_spec(spec))
  location = {"tar": "pattern", "csv": "path", "tsv": "path", "tfds": "name"}.get(corpus.get("kind"))
  if not location or not corpus.get(location):
    raise corpus_lib.CorpusError(
        f"no corpus given (config.corpus.kind {corpus.get('kind')!r}, {location or 'location'} "
        "empty): pass --corpus='tar:PATTERN', csv:PATH, tsv:PATH or tfds:NAME/SPLIT (quote brace "
        "patterns, or the shell expands them) or set config.corpus")
  return corpus_lib.make_corpus(corpus)


def job_settings(config: ml_collections.ConfigDict, corpus: corpus_lib.Corpus) -> dict:
  """The config a job's labels come from, kept in its plan so a rerun on a finished directory
  can stop before it loads (and hashes) any expert."""
  return {"experts": _plain(config.experts), "corpus": corpus.describe(),
          "split": job_options(config).split}


def _plain(value: Any) -> Any:
  """ConfigDict -> plain dicts/lists so experts and corpora get ordinary arguments."""
  if isinstance(value, (ml_collections.ConfigDict, Mapping)):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(_plain(v) for v in value)
  return value
