r"""Time and extra memory of converting a ViT-B/16 CLIP (random weights, scanned layout):
export to an HF folder (streamed), import back, open_clip export, and the naive in-memory export
for comparison. Memory is the peak of Python/NumPy allocations above the params themselves.

  python benchmarks/convert.py [--variant B/16] [--out results.json]
"""

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from clipzoo_jax import convert  # noqa: E402
from clipzoo_jax.convert import hf, layout, open_clip  # noqa: E402
from clipzoo_jax.models import variants  # noqa: E402

MIB = 2 ** 20


def random_params(cfg) -> dict:
  rng = np.random.default_rng(0)
  flat = {k: rng.standard_normal(s, np.float32) * 0.02 for k, s in layout.tower_shapes(cfg).items()}
  return layout.unflatten(layout.stack_layers(flat) if cfg.scan_layers else flat)


def measure(name: str, fn, results: dict) -> None:
  tracemalloc.start()
  start = time.perf_counter()
  fn()
  seconds = time.perf_counter() - start
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  results[name] = {"seconds": round(seconds, 3), "peak_extra_mib": round(peak / MIB, 1)}
  print(f"{name}: {seconds:.2f} s, peak extra {peak / MIB:.0f} MiB", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  cfg = variants.model_config(args.variant)
  cfg.scan_layers = True
  params = random_params(cfg)
  size = sum(v.nbytes for v in layout.flatten(params).values())
  results = {"variant": args.variant, "params_mib": round(size / MIB, 1),
             "num_params": sum(v.size for v in layout.flatten(params).values())}
  print(f"{args.variant}: {results['num_params'] / 1e6:.1f} M params, {size / MIB:.0f} MiB")
  hf.hf_config(cfg, 0.0)  # warm transformers' lazy imports so they are not timed
  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, "hf")
    measure("export_hf_streamed", lambda: hf.export(params, cfg, folder, (0.5,) * 3, (0.5,) * 3),
            results)
    measure("import_hf", lambda: convert.load_pretrained(folder, cfg), results)
    measure("export_open_clip_safetensors",
            lambda: open_clip.export(params, cfg, os.path.join(tmp, "oc.safetensors")), results)

    def naive():
      from safetensors.numpy import save_file
      save_file(layout.to_torch_arrays(params, cfg, "hf"), os.path.join(tmp, "naive.safetensors"))

    measure("export_in_memory_for_comparison", naive, results)
  print(json.dumps(results, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
