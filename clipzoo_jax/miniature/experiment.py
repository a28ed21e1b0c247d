"""The paper in miniature, end to end: the model zoo, an uncurated corpus, its pseudo-labels, a
pre-trained CLIP, CLIP-FT and CLIPTeX fine-tunes over several seeds, the single-expert ablation,
their evaluation, the export of CLIPTeX to Hugging Face with a parity check, and the report.

Every stage leaves its output under one directory and is resumable: the zoo, the corpus and the
pseudo-labels skip what is complete, a finished training run has nothing to do, an evaluation
already in a run's metrics is not redone, so rerunning the command after an interruption
continues where it stopped. `experiment.json` records the settings; a rerun with other settings
is refused, naming what differs.

Layout of `out/`:
  zoo/ corpus/ pseudo_labels/ pretrain_data/        the data stages
  runs/pretrain/                                     the pre-training run (captions only)
  pretrained_clip/                                   its Hugging Face export: "the pre-trained CLIP"
  runs/clip/                                         its evaluation (step 0)
  runs/clip_ft_s<seed>/ runs/cliptex_s<seed>/        the fine-tunes
  runs/only_<task>_s<seed>/                          the ablation: one expert at a time
  export/cliptex_hf/ export/parity.json              CLIPTeX in PyTorch
  results.md results.json results.png                the comparison
  pseudo_labels.png                                  pseudo-labels next to the ground truth
  timings.json                                       seconds per stage
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Callable

from clipzoo_jax import atomic_files
from clipzoo_jax import cli
from clipzoo_jax import stop_signal

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALL_TASKS = ("seg", "depth", "normals", "det")
SETTINGS_NAME = "experiment.json"


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the results depend on: a rerun must use the same."""
  quick: bool = False
  seed: int = 0          # shifts every seed of the experiment: zoo, corpus, pre-training, fine-tunes
  num_seeds: int = 3     # fine-tune seeds per arm
  ablation: bool = True  # one fine-tune per single expert (seed `seed` only)

  @property
  def corpus_size(self) -> int:
    return 512 if self.quick else 2048

  def finetune_seeds(self) -> list[int]:
    return [self.seed + i for i in range(self.num_seeds)]


def check_settings(out_dir: str, settings: Settings) -> None:
  """Writes `experiment.json` on the first run; refuses a rerun with other settings."""
  path = os.path.join(out_dir, SETTINGS_NAME)
  wanted = dataclasses.asdict(settings)
  if os.path.exists(path):
    with open(path) as f:
      found = json.load(f)
    differ = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
    if differ:
      detail = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differ.items())
      raise cli.UserError(f"{out_dir} holds an experiment with other settings ({detail}); use "
                          "another --out, or the same flags as before")
    return
  os.makedirs(out_dir, exist_ok=True)
  atomic_files.write_text(path, json.dumps(wanted, indent=1) + "\n")


def run_tool(args: list[str], log: Callable[[str], None]) -> None:
  """Runs `python tools/<tool> ...` as a user would; its output streams through; a failure
  stops the experiment naming the command."""
  command = [sys.executable, os.path.join(ROOT, "tools", args[0]), *args[1:]]
  log("$ " + " ".join(["python", "tools/" + args[0], *args[1:]]))
  env = dict(os.environ)  # the tools import clipzoo_jax from this checkout, installed or not
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
  result = subprocess.run(command, cwd=ROOT, env=env, check=False)
  if result.returncode:
    raise cli.UserError(f"miniature: {' '.join(command[1:])} failed with exit code "
                        f"{result.returncode} (its output is above)")


def metrics_row(workdir: str) -> dict:
  """Every metric of the run: the newest value of each key across metrics.jsonl."""
  from clipzoo_jax.evals import report  # pylint: disable=import-outside-toplevel
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return {}
  return {key: value for key, (_, value) in report.latest_metrics(workdir).items()}


def has_evals(workdir: str, evals_config) -> bool:
  row = metrics_row(workdir)
  return all(any(key.startswith(f"{name}/") for key in row) for name in evals_config)


class Stopped(Exception):
  """SIGTERM arrived: the stage in progress saved what it had; the rest waits for a rerun."""


def check_stop(after: str) -> None:
  if stop_signal.requested():
    raise Stopped(after)


class Experiment:
  """The stages in order; `run()` does what is left and writes the report."""

  def __init__(self, out_dir: str, settings: Settings, log: Callable[[str], None] = print):
    self.out = os.path.abspath(out_dir)
    self.settings = settings
    self.log = log
    self.timings: dict[str, float] = {}
    self.path = lambda *parts: os.path.join(self.out, *parts)

  # -- stages --------------------------------------------------------------------------------

  def stages(self) -> list[tuple[str, Callable[[], None]]]:
    stages = [("zoo", self.build_zoo), ("corpus", self.write_corpus),
              ("pseudo_labels", self.pseudo_label), ("pretrain", self.pretrain),
              ("clip_eval", self.evaluate_clip)]
    for seed in self.settings.finetune_seeds():
      stages.append((f"clip_ft_s{seed}", lambda seed=seed: self.finetune([], seed)))
      stages.append((f"cliptex_s{seed}", lambda seed=seed: self.finetune(list(ALL_TASKS), seed)))
    if self.settings.ablation:
      for task in ALL_TASKS:
        stages.append((f"only_{task}_s{self.settings.seed}",
                       lambda task=task: self.finetune([task], self.settings.seed)))
    stages += [("export", self.export), ("report", self.report)]
    return stages

  def run(self) -> dict:
    """The stages left to do; the results ({} when SIGTERM stopped the experiment first)."""
    check_settings(self.out, self.settings)
    stages = self.stages()
    start = time.perf_counter()
    for index, (name, stage) in enumerate(stages):
      self.log(f"== stage {index + 1}/{len(stages)}: {name} "
               f"({time.perf_counter() - start:.0f} s so far)")
      began = time.perf_counter()
      try:
        stage()
        check_stop(name)
      except Stopped:
        self.log(f"== stopped by SIGTERM in stage {name}: what it finished is saved; run the "
                 "same command again to continue")
        return {}
      self.timings[name] = round(time.perf_counter() - began, 1)
      atomic_files.write_text(self.path("timings.json"), json.dumps(self.timings, indent=1))
    self.log(f"== done in {time.perf_counter() - start:.0f} s: {self.path('results.md')}")
    with open(self.path("results.json")) as f:
      return json.load(f)

  def build_zoo(self) -> None:
    from clipzoo_jax.miniature import zoo  # pylint: disable=import-outside-toplevel
    zoo.build_zoo(self.path("zoo"), quick=self.settings.quick, seed=self.settings.seed,
                  log=self.log)

  def write_corpus(self) -> None:
    from clipzoo_jax.miniature import corpus  # pylint: disable=import-outside-toplevel
    self.corpus_pattern = corpus.write_corpus(
        self.path("corpus"), self.settings.corpus_size, seed=3000 + self.settings.seed,
        log=self.log)

  def pseudo_label(self) -> None:
    if not hasattr(self, "corpus_pattern"):
      self.write_corpus()  # resumable: returns the pattern of the finished corpus
    run_tool(["pseudo_label.py", f"--config=configs/pseudo_label/demo_zoo.py:"
              f"zoo_dir={self.path('zoo')}", f"--corpus={self.corpus_pattern}",
              f"--output_dir={self.path('pseudo_labels')}"], self.log)
    run_tool(["pseudo_label.py", "--verify", f"--output_dir={self.path('pseudo_labels')}"],
             self.log)
    from clipzoo_jax.miniature import pictures  # pylint: disable=import-outside-toplevel
    pictures.pseudo_labels_vs_truth(self.path("pseudo_labels"), self.path("pseudo_labels.png"))

  def _train(self, arg: str, workdir: str):
    from clipzoo_jax import train  # pylint: disable=import-outside-toplevel
    import configs.miniature  # pylint: disable=import-outside-toplevel
    config = configs.miniature.get_config(arg)
    train.train(config, workdir)
    check_stop(workdir)  # a run stopped early is not to be exported or evaluated
    return config

  def pretrain(self) -> None:
    settings = self.settings
    arg = (f"stage=pretrain,seed={settings.seed},quick={settings.quick},"
           f"data_dir={self.path('pretrain_data')}")
    self._train(arg, self.path("runs", "pretrain"))
    target = self.path("pretrained_clip")
    if not os.path.exists(os.path.join(target, "config.json")):
      partial = target + ".partial"
      run_tool(["convert.py", "export", "--workdir", self.path("runs", "pretrain"),
                "--out", partial], self.log)
      os.replace(partial, target)

  def _finetune_arg(self, tasks, seed: int) -> str:
    return (f"stage=finetune,tasks={'+'.join(tasks) or 'none'},seed={seed},"
            f"quick={self.settings.quick},data_dir={self.path('pseudo_labels')},"
            f"init={self.path('pretrained_clip')}")

  def evaluate_clip(self) -> None:
    """The pre-trained CLIP itself, through the fine-tunes' evaluators (as step 0)."""
    import configs.miniature  # pylint: disable=import-outside-toplevel
    from clipzoo_jax.evals import standalone  # pylint: disable=import-outside-toplevel
    config = configs.miniature.get_config(self._finetune_arg([], self.settings.seed))
    workdir = self.path("runs", "clip")
    if has_evals(workdir, config.evals):
      self.log(f"{workdir}: already evaluated")
      return
    os.makedirs(workdir, exist_ok=True)
    standalone.evaluate(config, workdir, init=self.path("pretrained_clip"), init_format="hf")

  def finetune(self, tasks, seed: int) -> None:
    name = {(): "clip_ft", ALL_TASKS: "cliptex"}.get(tuple(tasks), f"only_{'+'.join(tasks)}")
    workdir = self.path("runs", f"{name}_s{seed}")
    config = self._train(self._finetune_arg(tasks, seed), workdir)
    if not has_evals(workdir, config.evals):  # e.g. stopped after its last checkpoint
      from clipzoo_jax.evals import standalone  # pylint: disable=import-outside-toplevel
      standalone.evaluate(config, workdir)

  def export(self) -> None:
    """CLIPTeX (first seed) as a Hugging Face folder with its heads, and the parity report."""
    workdir = self.path("runs", f"cliptex_s{self.settings.seed}")
    target = self.path("export", "cliptex_hf")
    if not os.path.exists(os.path.join(target, "config.json")):
      partial = target + ".partial"
      run_tool(["convert.py", "export", "--workdir", workdir, "--out", partial], self.log)
      os.replace(partial, target)
    report = self.path("export", "parity.json")
    if not os.path.exists(report):
      run_tool(["convert.py", "check", "--workdir", workdir, "--hf", target,
                "--report", report], self.log)

  def report(self) -> None:
    from clipzoo_jax.miniature import results  # pylint: disable=import-outside-toplevel
    results.write(self.out, self.settings, self.log)
