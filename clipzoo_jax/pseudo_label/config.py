"""The pseudo-labelling job's parts (corpus, experts, options) built from a config
(`configs/pseudo_label/*.py`, whose args parse with `clipzoo_jax.config_args`)."""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from clipzoo_jax.experts import base
from clipzoo_jax.pseudo_label import corpus as corpus_lib
from clipzoo_jax.pseudo_label import job


def job_options(config: ml_collections.ConfigDict) -> job.JobOptions:
  options = _plain(config.get("job", {}))
  fields = set(job.JobOptions.__dataclass_fields__)
  unknown = sorted(set(options) - fields)
  if unknown:
    raise ValueError(f"config.job: unknown fields {unknown}; expected some of {sorted(fields)}")
  return job.JobOptions(**options)


def make_experts(config: ml_collections.ConfigDict) -> dict[str, base.Expert]:
  experts = {task: _plain(spec) for task, spec in config.experts.items()}
  if not experts:
    raise base.ExpertError("config.experts is empty; configure at least one task's expert")
  return base.build_experts(experts)


def make_corpus(config: ml_collections.ConfigDict, spec: str | None = None) -> corpus_lib.Corpus:
  """The corpus of `config.corpus`, with a `--corpus` shorthand (kind and location) applied on top."""
  corpus = _plain(config.get("corpus", {}))
  if spec:
    parsed = corpus_lib.parse_spec(spec)
    family = lambda kind: "csv" if kind == "tsv" else kind
    if family(parsed["kind"]) != family(corpus.get("kind")):  # another kind's options do not apply
      corpus = {}
    corpus.update(parsed)
  location = {"tar": "pattern", "csv": "path", "tsv": "path", "tfds": "name"}.get(corpus.get("kind"))
  if not location or not corpus.get(location):
    raise corpus_lib.CorpusError(
        f"no corpus given (config.corpus: {corpus}): pass --corpus=tar:'PATTERN'|csv:PATH|"
        "tsv:PATH|tfds:NAME/SPLIT (quote brace patterns from the shell) or set config.corpus")
  return corpus_lib.make_corpus(corpus)


def _plain(value: Any) -> Any:
  """ConfigDict -> plain dicts/lists so experts and corpora get ordinary arguments."""
  if isinstance(value, (ml_collections.ConfigDict, Mapping)):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(_plain(v) for v in value)
  return value
