"""Pictures of a run: the loss curves of `metrics.jsonl` (total and per task) as one PNG."""

from __future__ import annotations

import json
import os


def read_metrics(workdir: str) -> list[dict]:
  """Rows of metrics.jsonl; a resumed run's later rows replace earlier rows of the same step."""
  rows: dict[int, dict] = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      rows[row["step"]] = row
  return [rows[step] for step in sorted(rows)]


def plot_losses(workdir: str, out: str | None = None) -> str:
  """Writes `<workdir>/loss.png`: one panel per loss (`loss`, `loss/<task>`); returns its path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_metrics(workdir)
  names = sorted({k for row in rows for k in row if k.startswith("loss")},
                 key=lambda k: (k != "loss", k))
  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
  steps = [row["step"] for row in rows]
  for ax, name in zip(axes[0], names):
    ax.plot(steps, [row.get(name, float("nan")) for row in rows], lw=1.5)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fig.suptitle(os.path.basename(os.path.abspath(workdir)), fontsize=10)
  fig.tight_layout()
  out = out or os.path.join(workdir, "loss.png")
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out
