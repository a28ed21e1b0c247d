"""TensorFlow twins of the label codecs in `records.py`, for the loader's graph: decoding of
stored PNG labels, with a 1x1 stand-in for an absent label so the graph needs no tf.cond per
task (the stand-in is then masked out). Imported only where tf.data runs."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from clipzoo_jax.data import records

ABSENT_PNG_U8 = {1: records.encode_png(np.zeros((1, 1), np.uint8)),
                 3: records.encode_png(np.zeros((1, 1, 3), np.uint8))}
ABSENT_PNG_U16 = records.encode_png(np.zeros((1, 1), np.uint16))


def png_or_stand_in(encoded, stand_in: bytes):
  """(the PNG, or `stand_in` when the record has none; whether it had one)."""
  present = tf.strings.length(encoded) > 0
  return tf.where(present, encoded, stand_in), present


def png_bit_depth(png):
  """Byte 24 of a PNG (in the IHDR chunk) is its bit depth."""
  return tf.io.decode_raw(tf.strings.substr(png, 24, 1), tf.uint8)[0]
