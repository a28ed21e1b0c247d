"""Pictures of a run: the loss curves of `metrics.jsonl` (total and per task) as one PNG, drawn
from the same rows `metrics.read_rows` gives every other reader."""

from __future__ import annotations

import io

from clipzoo_jax import metrics
from clipzoo_jax import storage


def loss_series(workdir: str) -> dict[str, tuple[list[int], list[float]]]:
  """{loss name: (steps, values)} of every `loss` / `loss/<task>` column, total first."""
  rows = metrics.read_rows(workdir)
  names = sorted({k for row in rows for k in row if k.startswith("loss")},
                 key=lambda k: (k != "loss", k))
  return {name: ([row["step"] for row in rows if name in row],
                 [row[name] for row in rows if name in row]) for name in names}


def plot_losses(workdir: str, out: str | None = None) -> str:
  """Writes `<workdir>/loss.png` (local or in a bucket): one panel per loss (`loss`,
  `loss/<task>`); returns its path."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  series = loss_series(workdir)
  fig, axes = plt.subplots(1, max(len(series), 1), figsize=(3.2 * max(len(series), 1), 2.8),
                           squeeze=False)
  for ax, (name, (steps, values)) in zip(axes[0], series.items()):
    ax.plot(steps, values, lw=1.5)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fig.suptitle(storage.basename(storage.absolute(workdir)), fontsize=10)
  fig.tight_layout()
  out = out or storage.join(workdir, "loss.png")
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  storage.write_bytes(out, png.getvalue())
  return out
