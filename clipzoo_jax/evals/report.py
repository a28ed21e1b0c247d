"""Runs side by side, the way the paper compares CLIP, CLIP-FT and CLIPTeX: each run's latest
value of every evaluator metric in a markdown table and a PNG bar chart, with each metric's
relative change against the first run (the baseline).

Evaluator metrics are the columns of metrics.jsonl under the prefixes of the run's
`config.evals` (from its saved config.json); a workdir without one contributes every column that
is not a training column (loss, learning rate, rates, data counters).
"""

from __future__ import annotations

import math
import os

from clipzoo_jax import atomic_files
from clipzoo_jax import checkpoint as checkpoint_lib
from clipzoo_jax import cli
from clipzoo_jax import metrics as metrics_lib
from clipzoo_jax import storage

TRAINING_COLUMNS = ("step", "loss", "learning_rate", "examples_per_sec", "grad_norm",
                    "temperature")
TRAINING_PREFIXES = ("loss/", "data/", "train/")
# Metric names (last part) where lower is better; the table marks them so a negative change reads
# as the improvement it is.
LOWER_IS_BETTER = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "mean", "median",
                   "probe_train_loss")


def evaluator_prefixes(workdir: str) -> list[str] | None:
  if not storage.exists(storage.join(workdir, checkpoint_lib.CONFIG_NAME)):
    return None
  evals = checkpoint_lib.load_config(workdir).get("evals") or {}
  return [(evals[name].get("prefix") or name) + "/" for name in evals] or None


def is_training_column(name: str) -> bool:
  return name in TRAINING_COLUMNS or name.startswith(TRAINING_PREFIXES)


def latest_metrics(workdir: str) -> dict[str, tuple[int, float]]:
  """{metric: (step, value)} of the latest row holding each evaluator metric of a run."""
  rows = metrics_lib.read_rows(workdir)
  if not rows:
    raise cli.UserError(f"{workdir}: no {metrics_lib.METRICS_FILE} rows; is it a run's workdir?")
  prefixes = evaluator_prefixes(workdir)
  latest = {}
  for row in rows:
    for name, value in row.items():
      wanted = (any(name.startswith(p) for p in prefixes) if prefixes
                else not is_training_column(name))
      if wanted:
        latest[name] = (int(row["step"]), float(value))
  return latest


def relative_change(value: float, baseline: float) -> float:
  if not (math.isfinite(value) and math.isfinite(baseline)) or baseline == 0:
    return math.nan
  return (value - baseline) / abs(baseline)


def _cell(value: float | None) -> str:
  return "—" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _change(change: float) -> str:
  return "—" if not math.isfinite(change) else f"{100 * change:+.1f}%"


def markdown_table(names: list[str], runs: list[dict]) -> str:
  """One row per metric: each run's value, and for runs after the first the relative change."""
  header = ["metric", names[0]]
  for name in names[1:]:
    header += [name, f"Δ vs {names[0]}"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  metrics = sorted({metric for run in runs for metric in run})
  for metric in metrics:
    base = runs[0].get(metric, (0, math.nan))[1]
    marker = " (↓)" if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER else ""
    cells = [f"`{metric}`{marker}", _cell(runs[0].get(metric, (0, None))[1])]
    for run in runs[1:]:
      value = run.get(metric, (0, math.nan))[1]
      cells += [_cell(value), _change(relative_change(value, base))]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def bar_chart(names: list[str], runs: list[dict], path: str) -> str:
  """One panel per metric, one bar per run, labelled with the change vs the first run."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  metrics = sorted({metric for run in runs for metric in run})
  columns = min(4, max(1, len(metrics)))
  rows = math.ceil(len(metrics) / columns)
  fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.6 * rows), squeeze=False)
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, metric in zip(axes.flat, metrics):
    values = [run.get(metric, (0, math.nan))[1] for run in runs]
    ax.bar(range(len(names)), values, color=[colours[i % len(colours)] for i in range(len(names))])
    for i, value in enumerate(values[1:], 1):
      ax.annotate(_change(relative_change(value, values[0])), (i, value if math.isfinite(value)
                                                               else 0), ha="center", fontsize=7)
    ax.set_xticks(range(len(names)), names, fontsize=7, rotation=20)
    ax.set_title(metric, fontsize=8)
  for ax in list(axes.flat)[len(metrics):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def compare(workdirs: list[str], out_dir: str, names: list[str] | None = None) -> tuple[str, str]:
  """Writes `<out_dir>/report.md` and `<out_dir>/report.png`; returns their paths."""
  if not workdirs:
    raise cli.UserError("--workdirs: give at least one run's workdir")
  names = list(names or [storage.basename(storage.absolute(w)) for w in workdirs])
  if len(names) != len(workdirs):
    raise cli.UserError(f"--names: expected {len(workdirs)} names (one per workdir), found "
                        f"{len(names)}")
  runs = [latest_metrics(workdir) for workdir in workdirs]
  os.makedirs(out_dir, exist_ok=True)
  steps = ", ".join(f"{name}: step {max((s for s, _ in run.values()), default=0)}"
                    for name, run in zip(names, runs))
  text = (f"# Evaluation report\n\nLatest evaluator values of each run ({steps}); Δ is the "
          f"relative change vs {names[0]}; (↓) marks metrics where lower is better.\n\n"
          + markdown_table(names, runs))
  md_path = os.path.join(out_dir, "report.md")
  atomic_files.write_text(md_path, text)
  return md_path, bar_chart(names, runs, os.path.join(out_dir, "report.png"))
