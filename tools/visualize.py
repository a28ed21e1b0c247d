"""Render N records of a pseudo-labelled shard directory as one PNG grid.

  python tools/visualize.py --dir=/data/cc3m_pl --num=8 --out=/tmp/labels.png --shard=3 --skip=0

User errors (no manifest, a shard out of range) print one line; --debug shows their traceback.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags

from clipzoo_jax import cli, visualize
from clipzoo_jax.data import shards

_DIR = flags.DEFINE_string("dir", None, "dataset directory (manifest.json + shards)", required=True)
_OUT = flags.DEFINE_string("out", "labels.png", "PNG file to write")
_NUM = flags.DEFINE_integer("num", 8, "records to show", lower_bound=1)
_SHARD = flags.DEFINE_integer("shard", None, "only this shard (index in the manifest)")
_SKIP = flags.DEFINE_integer("skip", 0, "records to skip first", lower_bound=0)
_PANEL = flags.DEFINE_integer("panel", visualize.PANEL, "panel size in pixels", lower_bound=8)


def _check_shard(directory: str, shard: int | None) -> None:
  count = len(shards.read_manifest(directory)["shards"])
  if shard is not None and not 0 <= shard < count:
    raise cli.UserError(f"--shard={shard}: {directory} has {count} shards (0..{count - 1})")


def main(argv):
  del argv  # cli.run refuses positional arguments
  _check_shard(_DIR.value, _SHARD.value)
  grid = visualize.visualize_directory(_DIR.value, _OUT.value, _NUM.value, _SHARD.value,
                                       _SKIP.value, _PANEL.value)
  if grid.shape[0] == 0:
    raise cli.UserError(f"{_DIR.value}: no records after --skip={_SKIP.value}")
  print(f"wrote {_OUT.value} ({grid.shape[1]}x{grid.shape[0]})")


if __name__ == "__main__":
  cli.run(main)
