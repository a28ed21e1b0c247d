r"""Will this config fit the pod? Compile its real train step for a TPU topology on this machine.

  python tools/aot_compile.py --config configs/cliptex.py:variant=B/16 --topology v5e:16x16 \
      --config.global_batch_size=32768 --config.mesh='[1,-1,1]' --config.model.remat=full
  python tools/aot_compile.py --config configs/demo.py --topology cpu:8

Prints per-chip memory (arguments, outputs, temporaries, generated code, total against the chip's
usable HBM) and FLOPs per step; exits 1 with the levers to pull when the step does not fit. TPU
topologies (v4, v5e, v5p, v6e) need libtpu: `pip install -r requirements-tpu.txt` (no TPU needed).
`cpu:N` compiles for N host CPU devices (sharding and FLOPs only; give --hbm_gib for a fit check).
"""

import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Compile-only: never initialise an attached accelerator (libtpu without a TPU only warns noisily).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _force_cpu_devices(argv) -> None:
  """`--topology cpu:N` needs N host devices, which XLA fixes when jax starts: set them now."""
  text = " ".join(argv)
  found = re.search(r"--topology[= ]cpu:(\d+)", text)
  flags_now = os.environ.get("XLA_FLAGS", "")
  if found and "xla_force_host_platform_device_count" not in flags_now:
    os.environ["XLA_FLAGS"] = (f"{flags_now} --xla_force_host_platform_device_count="
                               f"{found.group(1)}").strip()


_force_cpu_devices(sys.argv)

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from clipzoo_jax import cli  # noqa: E402
from clipzoo_jax import config_args  # noqa: E402

config_args.allow_list_overrides()

config_flags.DEFINE_config_file("config", None, "Config file, optionally with :args.",
                                lock_config=False)
flags.DEFINE_string("topology", None, "GENERATION:SHAPE: v5e:16x16 (v5e-256), v4:4x4x4 (v4-128), "
                    "v5p:4x4x8, v6e:8x8, or cpu:N for host CPU devices.")
flags.DEFINE_float("hbm_gib", None, "Fit against this many GiB per chip instead of the chip's "
                   "usable HBM (required for a fit check on cpu:N).")
flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  del argv
  import json
  from clipzoo_jax import aot
  topology = aot.parse_topology(flags.FLAGS.topology)
  config = flags.FLAGS.config
  report = aot.check(config, topology, flags.FLAGS.hbm_gib)
  print(aot.format_report(report))
  if flags.FLAGS.json:
    with open(flags.FLAGS.json, "w") as f:
      json.dump(report.to_json(), f, indent=1)
  aot.raise_unless_fits(report, config)


if __name__ == "__main__":
  cli.run(main)
