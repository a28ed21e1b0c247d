r"""Train (or resume) CLIPTeX / CLIP-FT from an ml_collections config.

  python tools/train.py --config configs/demo.py --workdir workdirs/demo [--config.total_steps=60]
  python tools/train.py --config configs/cliptex.py --workdir gs://BUCKET/run1 \
      --config.data.directory=gs://BUCKET/cc3m_labels --config.tokenizer.directory=gs://BUCKET/clip

Rerunning the same command resumes from the newest checkpoint in the workdir.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# gs:// paths: Orbax's etils.epath uses fsspec (gcsfs), the client clipzoo_jax.storage uses,
# rather than TensorFlow's GCS file system: one client and one set of credentials for the run.
os.environ.setdefault("EPATH_USE_TF", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clipzoo_jax import stop_signal  # noqa: E402

stop_signal.install()  # before the slow imports: a SIGTERM while starting still saves, exits 0

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from clipzoo_jax import cli  # noqa: E402
from clipzoo_jax import config_args  # noqa: E402

config_args.allow_list_overrides()

config_flags.DEFINE_config_file("config", None, "Config file, optionally with :args.",
                                lock_config=False)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and generated data.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process runs outside TPU pods.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax
  from clipzoo_jax import train
  if flags.FLAGS.coordinator_address:
    jax.distributed.initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                               flags.FLAGS.process_id)
  elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
    jax.distributed.initialize()
  train.main_from_flags(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main)
