"""Render N records of a pseudo-labelled shard directory as one PNG grid.

  python tools/visualize.py --dir=/data/cc3m_pl --num=8 --out=/tmp/labels.png [--shard=3 --skip=0]
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from clipzoo_jax import visualize

_DIR = flags.DEFINE_string("dir", None, "dataset directory (manifest.json + shards)", required=True)
_OUT = flags.DEFINE_string("out", "labels.png", "PNG file to write")
_NUM = flags.DEFINE_integer("num", 8, "records to show")
_SHARD = flags.DEFINE_integer("shard", None, "only this shard (index in the manifest)")
_SKIP = flags.DEFINE_integer("skip", 0, "records to skip first")
_PANEL = flags.DEFINE_integer("panel", visualize.PANEL, "panel size in pixels")


def main(argv):
  del argv
  grid = visualize.visualize_directory(_DIR.value, _OUT.value, _NUM.value, _SHARD.value,
                                       _SKIP.value, _PANEL.value)
  print(f"wrote {_OUT.value} ({grid.shape[1]}x{grid.shape[0]})")


if __name__ == "__main__":
  app.run(main)
