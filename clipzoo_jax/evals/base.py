"""The evaluator protocol and registry, in big_vision's style.

Each evaluator is configured under `config.evals.<name>`:

  type        registry name (`zeroshot`, `retrieval`, `dense_probe`)
  dataset     where its examples come from (`clipzoo_jax.evals.datasets`)
  every       run every N steps (0: only at the end); `at_end` (True): also at the last step;
              never at a preemption stop (the job should save and leave quickly)
  prefix      metric name prefix (default: the evaluator's name): `<prefix>/<metric>`
  batch_size  global evaluation batch (default: config.global_batch_size)
  ...         the type's own keys (`OPTIONS` of its class); an unknown key is an error

`build_evaluators(config, run, workdir)` builds them once on the run's mesh, sharing one set of
jitted predict functions (`predict.Predictors`); the training loop asks `ev.every.due(moment)` and
writes what `ev.run(params)` yields into the step's metrics row, and `tools/evaluate.py` does the
same on a checkpoint, so both give the same numbers. A type lives in one module that registers
its class with `@register(type)` and is named in `_TYPE_MODULES` (imported on first use).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Iterator

import ml_collections

from clipzoo_jax import cli
from clipzoo_jax import periodic
from clipzoo_jax.evals import datasets

_TYPE_MODULES = {
    "zeroshot": "clipzoo_jax.evals.zeroshot",
    "retrieval": "clipzoo_jax.evals.retrieval",
    "dense_probe": "clipzoo_jax.evals.dense_probe",
}
_REGISTRY: dict[str, type] = {}
COMMON_OPTIONS = dict(type="", dataset=None, every=0, at_end=True, prefix="", batch_size=0)


def register(type_name: str):
  """Class decorator: makes an Evaluator subclass buildable with `type: <type_name>`."""
  def wrap(cls):
    _REGISTRY[type_name] = cls
    cls.type_name = type_name
    return cls
  return wrap


def known_types() -> tuple[str, ...]:
  return tuple(sorted(_TYPE_MODULES))


@dataclasses.dataclass
class EvalContext:
  """What every evaluator of a run shares: the run, its workdir and the jitted predict functions
  (built on first use, once for all evaluators)."""
  run: object  # clipzoo_jax.run.Run
  workdir: str

  @functools.cached_property
  def predict(self):
    from clipzoo_jax.evals import predict  # pylint: disable=import-outside-toplevel
    return predict.Predictors(self.run)

  @functools.cached_property
  def tokenizer(self):
    """The run's tokenizer (`config.tokenizer.directory`), loaded when first needed."""
    from clipzoo_jax.data import prepare, tokenizer  # pylint: disable=import-outside-toplevel
    config = self.run.config.tokenizer
    return tokenizer.Tokenizer.from_pretrained(prepare.resolve_path(config.directory, self.workdir),
                                               config.context_length)


def augment_options(config, label_size: int | None = None, max_boxes: int = 16):
  """Evaluation preprocessing of a run: central crops at the model's image size, dense labels at
  `label_size` (default: the image size)."""
  from clipzoo_jax.data import loader  # pylint: disable=import-outside-toplevel
  image_size = int(config.model.image.image_size)
  return loader.augment_options(dict(image_size=image_size,
                                     label_size=int(label_size or image_size),
                                     max_boxes=int(max_boxes)))


def _options(config, defaults: dict, where: str) -> ml_collections.ConfigDict:
  given = dict(config.to_dict() if hasattr(config, "to_dict") else config)
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise cli.UserError(f"{where}: unknown keys {unknown}; evaluator type {given.get('type')!r} "
                        f"takes {sorted(defaults)}")
  merged = {**defaults, **given}
  return ml_collections.ConfigDict(merged)


class Evaluator:
  """Base of the evaluator types. Subclasses set `OPTIONS` (their keys and defaults) and `needs`
  (the dataset label fields they read) and implement `evaluate(params)` yielding (metric, value).

  Public interface: `name`, `every` (periodic.Every), `run(params)` -> (`prefix/metric`, float).
  """
  type_name = ""
  OPTIONS: dict = {}
  needs: tuple[str, ...] = ()
  DEFAULT_DATASET: dict = {}  # the offline toy-world split used when `dataset` is not set

  def __init__(self, name: str, config, context: EvalContext):
    from clipzoo_jax.evals import predict  # pylint: disable=import-outside-toplevel
    self.name = name
    self.where = f"config.evals.{name}"
    self.context = context
    self.options = _options(config, {**COMMON_OPTIONS, **self.OPTIONS}, self.where)
    if int(self.options.every) < 0:
      raise cli.UserError(f"{self.where}.every: expected >= 0 steps (0: only at the end), found "
                          f"{self.options.every}")
    self.every = periodic.Every(int(self.options.every), at_last=bool(self.options.at_end),
                                at_stop=False)
    self.prefix = self.options.prefix or name
    batch_size = int(self.options.batch_size or context.run.config.global_batch_size)
    self.batch_size = predict.check_batch_size(batch_size, context.run.mesh,
                                               f"{self.where}.batch_size")
    self.dataset = self.build_dataset(self.options.dataset or self.DEFAULT_DATASET,
                                      f"{self.where}.dataset")

  def build_dataset(self, config, where: str) -> datasets.EvalSplit:
    """The dataset of `config`, checked to have the labels this evaluator needs."""
    split = datasets.from_config(config, self.context.workdir, where)
    datasets.require(split, self.needs, where, f"{self.name} (type {self.type_name!r})")
    return split

  def augment_options(self, label_size: int | None = None, max_boxes: int = 16):
    return augment_options(self.context.run.config, label_size, max_boxes)

  def evaluate(self, params) -> Iterator[tuple[str, float]]:
    raise NotImplementedError

  def run(self, params) -> Iterator[tuple[str, float]]:
    """(`<prefix>/<metric>`, value) for every metric of one evaluation of `params`."""
    for metric, value in self.evaluate(params):
      yield f"{self.prefix}/{metric}", float(value)


def build_evaluator(name: str, config, context: EvalContext) -> Evaluator:
  where = f"config.evals.{name}"
  if not isinstance(config, (dict, ml_collections.ConfigDict)):
    raise cli.UserError(f"{where}: expected a dict of evaluator options, found {config!r}")
  type_name = config.get("type")
  if type_name not in _TYPE_MODULES:
    raise cli.UserError(f"{where}.type: expected one of {list(known_types())}, found {type_name!r}")
  importlib.import_module(_TYPE_MODULES[type_name])
  return _REGISTRY[type_name](name, config, context)


def build_evaluators(config, run, workdir: str) -> list[Evaluator]:
  """The evaluators of `config.evals` (none: []), in name order, sharing one EvalContext."""
  evals = config.get("evals") or {}
  context = EvalContext(run, workdir)
  return [build_evaluator(name, evals[name], context) for name in sorted(evals)]
