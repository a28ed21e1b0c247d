"""The comparison the paper makes, from the runs' metrics: CLIP / CLIP-FT / CLIPTeX on the dense
probes, zero-shot and retrieval (mean and spread over the fine-tune seeds, and whether a
difference stands out of the seed noise), the single-expert ablation, the zoo's own accuracy,
as `results.md`, `results.json` and `results.png`."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from clipzoo_jax import atomic_files
from clipzoo_jax.miniature import experiment

# (metric key, short name, higher is better)
CHANCE = {"zeroshot/top1": 1 / 30, "zeroshot_colour/top1": 1 / 10}
METRICS = (
    ("seg_probe/miou", "seg mIoU", True),
    ("depth_probe/abs_rel", "depth AbsRel", False),
    ("normals_probe/mean", "normals mean angle (deg)", False),
    ("det_probe/ap50", "det AP50", True),
    ("zeroshot/top1", "zero-shot top-1 (30 objects)", True),
    ("zeroshot_colour/top1", "zero-shot top-1 (10 colours)", True),
    ("retrieval/image_to_text/recall_at_1", "image-to-text R@1", True),
    ("retrieval/text_to_image/recall_at_1", "text-to-image R@1", True),
)
ARMS = (("CLIP", "clip"), ("CLIP-FT", "clip_ft"), ("CLIPTeX", "cliptex"))


def _row(run_dir: str, name: str) -> dict[str, float]:
  """The headline metrics a run has (absent ones left out)."""
  row = experiment.metrics_row(os.path.join(run_dir, name))
  return {key: float(row[key]) for key, _, _ in METRICS if key in row}


def summarize(values: list[float]) -> dict:
  array = np.asarray(values, np.float64)
  return {"values": [float(v) for v in array], "n": len(array),
          "mean": float(array.mean()) if len(array) else math.nan,
          "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0}


def verdict(ft: dict, tex: dict, higher_is_better: bool) -> str:
  """CLIPTeX vs CLIP-FT: 'better' / 'worse' when the mean difference exceeds twice its standard
  error over seeds (Welch), else 'within noise'; with one seed per arm, only the sign."""
  if not ft["n"] or not tex["n"]:
    return "n/a"
  diff = tex["mean"] - ft["mean"]
  if min(ft["n"], tex["n"]) < 2:  # no spread to compare with: the sign only
    return ("higher" if diff > 0 else "lower" if diff < 0 else "equal") + " (1 seed)"
  error = math.sqrt(ft["std"] ** 2 / ft["n"] + tex["std"] ** 2 / tex["n"])
  if abs(diff) <= 2 * error or diff == 0:
    return "within noise"
  return "better" if (diff > 0) == higher_is_better else "worse"


def _fmt(summary: dict) -> str:
  if not summary["n"]:
    return "–"
  if summary["n"] == 1:
    return f"{summary['mean']:.3f}"
  return f"{summary['mean']:.3f} ± {summary['std']:.3f}"


def collect(out_dir: str, settings) -> dict:
  run_dir = os.path.join(out_dir, "runs")
  seeds = settings.finetune_seeds()
  rows = {"CLIP": [_row(run_dir, "clip")],
          "CLIP-FT": [_row(run_dir, f"clip_ft_s{seed}") for seed in seeds],
          "CLIPTeX": [_row(run_dir, f"cliptex_s{seed}") for seed in seeds]}
  table = {}
  for key, name, higher in METRICS:
    arms = {label: summarize([row[key] for row in arm_rows if key in row])
            for label, arm_rows in rows.items()}
    table[key] = {"name": name, "higher_is_better": higher, **arms,
                  "cliptex_vs_clip_ft": verdict(arms["CLIP-FT"], arms["CLIPTeX"], higher)}
  ablation = {}
  if settings.ablation:
    ablation = {"seed": settings.seed, "CLIP-FT": rows["CLIP-FT"][0],
                "CLIPTeX": rows["CLIPTeX"][0]}
    for task in experiment.ALL_TASKS:
      ablation[f"only {task}"] = _row(run_dir, f"only_{task}_s{settings.seed}")
  return {"settings": dataclasses.asdict(settings), "seeds": seeds, "metrics": table,
          "ablation": ablation,
          "zoo": _read_json(os.path.join(out_dir, "zoo", "zoo.json")),
          "corpus": {k: v for k, v in (_read_json(os.path.join(
              out_dir, "corpus", "corpus.json")) or {}).items() if k != "noisy"} or None,
          "parity": _read_json(os.path.join(out_dir, "export", "parity.json")),
          "timings_s": _read_json(os.path.join(out_dir, "timings.json"))}


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def markdown(result: dict) -> str:
  seeds = result["seeds"]
  lines = ["# The paper in miniature: CLIP vs CLIP-FT vs CLIPTeX on the toy world", "",
           f"Fine-tunes: {len(seeds)} seeds each ({', '.join(map(str, seeds))}); mean ± standard "
           "deviation over seeds. CLIP is the one pre-trained model they all start from. The last "
           "column compares CLIPTeX with CLIP-FT: 'better'/'worse' when the difference of the "
           "means exceeds twice its standard error over seeds.", "",
           "| metric | CLIP | CLIP-FT | CLIPTeX | CLIPTeX vs CLIP-FT |", "|---|---|---|---|---|"]
  for entry in result["metrics"].values():
    arrow = "↑" if entry["higher_is_better"] else "↓"
    lines.append(f"| {entry['name']} {arrow} | {_fmt(entry['CLIP'])} | {_fmt(entry['CLIP-FT'])} "
                 f"| {_fmt(entry['CLIPTeX'])} | {entry['cliptex_vs_clip_ft']} |")
  ablation = result["ablation"]
  if ablation:
    names = {key: name for key, name, _ in METRICS}
    keys = [key for key, _, _ in METRICS if key in ablation["CLIP-FT"]]
    base = ablation["CLIP-FT"]
    lines += ["", f"## Ablation: one expert at a time (seed {ablation['seed']})", "",
              "A fine-tune with one expert's pseudo-labels; in brackets the change against "
              "CLIP-FT of the same seed (seed-to-seed spread: the table above).", "",
              "| experts | " + " | ".join(names[k] for k in keys) + " |",
              "|---|" + "---|" * len(keys)]
    for label in ["CLIP-FT"] + [f"only {task}" for task in experiment.ALL_TASKS] + ["CLIPTeX"]:
      row = ablation.get(label, {})
      cells = [("–" if key not in row else f"{row[key]:.3f}" if label == "CLIP-FT"
                else f"{row[key]:.3f} ({row[key] - base[key]:+.3f})") for key in keys]
      lines.append(f"| {'all four (CLIPTeX)' if label == 'CLIPTeX' else label} | "
                   + " | ".join(cells) + " |")
  zoo = result.get("zoo")
  if zoo and zoo.get("report"):
    from clipzoo_jax.miniature import zoo as zoo_lib  # pylint: disable=import-outside-toplevel
    lines += ["", "## The model zoo's own accuracy on held-out labelled scenes", "",
              "The experts whose hard labels CLIPTeX learns from (`zoo/`), against an untrained "
              "expert of the same architecture: imperfect, as real ones are.", "",
              zoo_lib.report_table(zoo).rstrip()]
  corpus = result.get("corpus")
  if corpus:
    counts = corpus["counts"]
    lines += ["", f"Corpus: {sum(counts.values())} toy-world images with uncurated captions: "
              f"{counts.get('wrong', 0)} wrong, {counts.get('vague', 0)} vague, "
              f"{counts.get('true', 0)} true (`corpus/corpus.json` lists the noisy keys)."]
  parity = result.get("parity")
  if parity:
    lines += ["", f"CLIPTeX exported to Hugging Face (`export/cliptex_hf`): parity "
              f"{'ok' if parity['ok'] else 'FAILED'}, max relative error {parity['max']:.2e} "
              f"(tolerance {parity['tolerance']:.0e})."]
  timings = result.get("timings_s")
  if timings:
    lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
              + f"; total {sum(timings.values()):.0f}."]
  return "\n".join(lines) + "\n"


def chart(result: dict, path: str) -> str:
  """One panel per metric: a bar per model (mean over seeds), each seed a dot, spread as error
  bars."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  entries = list(result["metrics"].values())
  columns = 4
  rows = math.ceil(len(entries) / columns)
  fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows), squeeze=False)
  colours = ("#9e9e9e", "#4e79a7", "#e15759")
  for ax, entry in zip(axes.flat, entries):
    for i, (label, _) in enumerate(ARMS):
      summary = entry[label]
      if not summary["n"]:
        continue
      ax.bar(i, summary["mean"], yerr=summary["std"] or None, color=colours[i], capsize=3)
      ax.scatter([i] * summary["n"], summary["values"], color="black", s=8, zorder=3)
    key = next(k for k, v in result["metrics"].items() if v is entry)
    if key in CHANCE:
      ax.axhline(CHANCE[key], color="black", linestyle="--", linewidth=0.8, label="chance")
      ax.legend(fontsize=7, loc="lower right")
    ax.set_xticks(range(len(ARMS)), [label for label, _ in ARMS], fontsize=8)
    ax.set_title(f"{entry['name']} {'↑' if entry['higher_is_better'] else '↓'}", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
  for ax in list(axes.flat)[len(entries):]:
    ax.axis("off")
  fig.suptitle(f"CLIP / CLIP-FT / CLIPTeX, {len(result['seeds'])} fine-tune seeds", fontsize=10)
  fig.tight_layout()
  partial = path + ".partial.png"
  fig.savefig(partial, dpi=110)
  plt.close(fig)
  os.replace(partial, path)
  return path


def write(out_dir: str, settings, log=print) -> dict:
  result = collect(out_dir, settings)
  atomic_files.write_text(os.path.join(out_dir, "results.json"), json.dumps(result, indent=1))
  text = markdown(result)
  atomic_files.write_text(os.path.join(out_dir, "results.md"), text)
  chart(result, os.path.join(out_dir, "results.png"))
  from clipzoo_jax.miniature import pictures  # pylint: disable=import-outside-toplevel
  seed = settings.finetune_seeds()[0]
  pictures.probe_predictions(
      [(label, os.path.join(out_dir, "runs", name)) for label, name in
       (("CLIP", "clip"), ("CLIP-FT", f"clip_ft_s{seed}"), ("CLIPTeX", f"cliptex_s{seed}"))],
      os.path.join(out_dir, "probes.png"))
  log(text)
  return result
