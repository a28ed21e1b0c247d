"""Per-chip memory of the big CLIPTeX steps on TPU pods, compiled ahead of time on this machine
(libtpu compile-only devices, `clipzoo_jax.aot`), beside big_vision's figures for the same shapes.

B/16 CLIPTeX (four heads) at global batch 32768 on v5e-256 (v5e:16x16, fsdp over all 256 chips)
under each remat policy of the model config, and L/14 CLIPTeX on v4-128 (v4:4x4x4, 64 megacore
chips) with full remat, with and without the heads. bf16 matmuls, scanned layers. Each case compiles in its own process (minutes
on 2 cores); results are written after every case, so an interrupted run keeps what it measured.

  pip install -r requirements-tpu.txt
  python benchmarks/aot_memory.py [--cases b16_full,l14_full] [--timeout_s 1800]
  python benchmarks/aot_memory.py --table   # the saved results again

Writes benchmarks/results/aot_memory.json and prints a table. "total" is arguments + outputs -
aliased + temporaries + generated code; "total-code" leaves the generated code out.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: no accelerator is initialised
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESULTS = os.path.join(ROOT, "benchmarks", "results", "aot_memory.json")
B16 = dict(variant="B/16", topology="v5e:16x16", pod="v5e-256")
L14 = dict(variant="L/14", topology="v4:4x4x4", pod="v4-128")
# case -> (shape, remat policy, big_vision's GiB/chip for the two towers alone (SigLIP, same
# shapes, measured here earlier), the issue's hand-measured CLIPTeX figure or None)
CASES = {
    "b16_full": (B16, "full", 2.42, 2.57),
    "b16_dots_with_no_batch_dims_saveable": (B16, "dots_with_no_batch_dims_saveable", None, 8.22),
    "b16_dots_saveable": (B16, "dots_saveable", 10.03, None),
    "b16_none": (B16, "none", 12.42, None),  # the issue: does not fit (25.5 GB temporaries)
    "b16_none_chunk4096": (B16, "none", 12.42, None),
    "b16_none_accum2": (B16, "none", 12.42, None),
    "b16_none_accum4": (B16, "none", 12.42, None),
    "l14_full": (L14, "full", 10.77, None),
    "l14_full_towers_only": (L14, "full", 10.77, None),  # tasks=none: what big_vision measured
}
CONFIG_ARGS = {"l14_full_towers_only": "tasks=none"}  # beyond variant and batch size
# The loss's memory levers (config keys set after the config is built): the contrastive logits
# 4096 rows at a time, and gradient accumulation over 2 or 4 micro-batches (same gradient).
OVERRIDES = {"b16_none_chunk4096": {"loss.contrastive_chunk": 4096},
             "b16_none_accum2": {"grad_accum_steps": 2},
             "b16_none_accum4": {"grad_accum_steps": 4}}
GLOBAL_BATCH = 32768


def case_config(name: str):
  from clipzoo_jax import sweep  # pylint: disable=import-outside-toplevel
  shape, remat, _, _ = CASES[name]
  config = sweep.load_config_module(os.path.join(ROOT, "configs", "cliptex.py")).get_config(
      ",".join(filter(None, (f"variant={shape['variant']},batch_size={GLOBAL_BATCH}",
                             CONFIG_ARGS.get(name)))))
  config.model.remat = remat
  config.model.scan_layers = True
  config.mesh = [1, -1, 1]  # fsdp over every chip
  for key, value in OVERRIDES.get(name, {}).items():
    *parents, leaf = key.split(".")
    target = config
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def code_revision() -> str | None:
  """The commit the measured code is at, "+changes" when the working tree differs from it (rows
  of one results file can come from different runs: each row says which code it measured)."""
  def git(*args):
    result = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                            check=False)
    return result.stdout.strip() if result.returncode == 0 else None
  commit = git("rev-parse", "--short", "HEAD")
  if commit and git("status", "--porcelain", "--untracked-files=no", "--", "clipzoo_jax",
                    "configs"):
    commit += "+changes"
  return commit


def child(name: str) -> dict:
  """One case in this process: compile, report (or the compiler's refusal)."""
  from clipzoo_jax import aot  # pylint: disable=import-outside-toplevel
  shape, remat, big_vision, issue = CASES[name]
  config = case_config(name)
  row = {"case": name, "variant": shape["variant"], "pod": shape["pod"],
         "tasks": list(config.model.heads.tasks), "topology": shape["topology"], "remat": remat,
         "overrides": OVERRIDES.get(name, {}),
         "global_batch": GLOBAL_BATCH, "big_vision_gib": big_vision, "issue_cliptex_gib": issue,
         "code": code_revision()}
  start = time.perf_counter()
  try:
    report = aot.check(config, aot.parse_topology(shape["topology"]))
    row.update(report.to_json())
  except aot.DoesNotFit as error:
    row.update(fits=False, message=str(error))
  row["compile_s"] = time.perf_counter() - start
  return row


def run_case(name: str, timeout_s: float) -> dict:
  command = [sys.executable, os.path.abspath(__file__), "--child", name]
  start = time.perf_counter()
  try:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                            check=False)
  except subprocess.TimeoutExpired:
    return {"case": name, "error": f"timed out after {timeout_s:.0f} s"}
  lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
  if result.returncode or not lines:
    return {"case": name, "error": (result.stderr.strip().splitlines() or ["?"])[-1],
            "wall_s": time.perf_counter() - start}
  return json.loads(lines[-1])


def write(rows: list) -> None:
  """Saves `rows` over the saved rows of the same cases (a rerun of some cases keeps the rest)."""
  saved = {}
  if os.path.exists(RESULTS):
    with open(RESULTS) as f:
      saved = {row["case"]: row for row in json.load(f)["rows"]}
  saved.update({row["case"]: row for row in rows})
  ordered = [saved[name] for name in CASES if name in saved]
  result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "libtpu": _libtpu_version(), "rows": ordered}
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS + ".tmp", "w") as f:
    json.dump(result, f, indent=1)
  os.replace(RESULTS + ".tmp", RESULTS)


def _libtpu_version():
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    return None


def _gib(value) -> str:
  return "-" if value is None else f"{value:.2f}"


def print_table(rows: list) -> None:
  print(" | ".join(("case", "pod", "remat", "args GiB", "temp GiB", "total GiB",
                    "total-code GiB", "usable GiB", "fits", "big_vision GiB", "issue GiB",
                    "TFLOP/step", "compile s", "code")))
  for r in rows:
    if "error" in r:
      print(f"{r['case']} | error: {r['error']}")
      continue
    total = r.get("total_gib")
    print(" | ".join(str(v) for v in (
        r["case"], r["pod"], r["remat"], _gib(r.get("arguments_gib")),
        _gib(r.get("temporaries_gib")), _gib(total),
        _gib(None if total is None else total - r["generated_code_gib"]),
        _gib(r.get("hbm_limit_gib")),
        r["fits"], _gib(r["big_vision_gib"]), _gib(r["issue_cliptex_gib"]),
        "-" if "flops_per_step" not in r else f"{r['flops_per_step'] / 1e12:.0f}",
        f"{r['compile_s']:.0f}", r.get("code") or "-")))
    if "message" in r:
      print(f"  {r['message']}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--timeout_s", type=float, default=1800, help="per case")
  parser.add_argument("--table", action="store_true", help="print the saved results' table")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args.child)))
    return
  if args.table:
    with open(RESULTS) as f:
      print_table(json.load(f)["rows"])
    return
  unknown = sorted(set(args.cases.split(",")) - set(CASES))
  if unknown:
    sys.exit(f"error: unknown cases {unknown}; known: {sorted(CASES)}")
  if _libtpu_version() is None:
    sys.exit("error: libtpu is not installed: pip install -r requirements-tpu.txt")
  rows = []
  for name in args.cases.split(","):
    print(f"compiling {name} ...", flush=True)
    rows.append(run_case(name, args.timeout_s))
    write(rows)
  print_table(rows)


if __name__ == "__main__":
  main()
