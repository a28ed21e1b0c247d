"""Makes a run's inputs exist before training: the built-in toy-world shards (when the config asks
for them) and a tokenizer (loaded from a CLIP folder, or trained on the dataset's captions).

Either may live in a bucket (`storage`): with `--workdir=gs://...` and the demo's data directory
(relative to the workdir) the toy world is generated on this machine and uploaded to
`<workdir>/data/toyworld`, and the tokenizer trained on its captions is written to
`<workdir>/tokenizer`."""

from __future__ import annotations

import logging
import os

import jax
import ml_collections
from jax.experimental import multihost_utils

from clipzoo_jax import storage
from clipzoo_jax.data import shards


def resolve_path(path: str, workdir: str) -> str:
  """Config paths are relative to the workdir unless absolute (or `~`) or a URL (`gs://...`);
  the workdir itself may be a URL."""
  if storage.is_url(path):
    return path
  path = os.path.expanduser(path)
  return path if os.path.isabs(path) else storage.join(storage.absolute(workdir), path)


def dataset_captions(directory: str, limit: int) -> list[str]:
  """The captions of the first `limit` records in manifest order, local or in a bucket."""
  # pylint: disable-next=import-outside-toplevel
  from clipzoo_jax.data import example_proto, random_access
  captions = []
  for path in shards.shard_paths(directory):
    for serialized in random_access.read_in_order(path):
      if len(captions) == limit:
        return captions
      captions.append(example_proto.parse(serialized)["text"][0].decode("utf-8"))
  return captions


def _on_process_zero_then_sync(fn, name: str):
  if jax.process_index() == 0:
    fn()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _holds_other_dataset(directory: str) -> bool:
  """Whether `directory` has a complete dataset that the toy-world generator did not write."""
  if not storage.exists(storage.join(directory, shards.MANIFEST_NAME)):
    return False
  return "toyworld" not in shards.read_manifest(directory)


def prepare_dataset(data_config: ml_collections.ConfigDict, workdir: str) -> str:
  """The dataset directory of `config.data.directory`. With `config.data.toyworld` set, the toy
  world is generated there when the directory has no dataset; a directory that already holds
  pseudo-labelled shards is used as it is, so `--config.data.directory=DIR` alone points any
  config at your own shards."""
  directory = resolve_path(data_config.directory, workdir)
  toy = data_config.get("toyworld")
  if toy and _holds_other_dataset(directory):
    logging.info("%s holds a pseudo-labelled dataset: training on it (config.data.toyworld only "
                 "generates data where there is none)", directory)
  elif toy:
    from clipzoo_jax.data import toyworld
    _on_process_zero_then_sync(lambda: toyworld.write_dataset(
        directory, num_examples=toy.num_examples, seed=toy.seed, size=toy.size,
        num_shards=toy.num_shards, split="train"), "toyworld")
  shards.read_manifest(directory)  # fails early, naming the directory, if there is no dataset
  return directory


def prepare_tokenizer(tokenizer_config: ml_collections.ConfigDict, dataset_dir: str, workdir: str):
  """Loads `tokenizer.directory`; if it is missing and `train_vocab_size` is set, trains a BPE on
  the dataset's captions there first (the demo's case)."""
  from clipzoo_jax.data import tokenizer as tokenizer_lib
  directory = resolve_path(tokenizer_config.directory, workdir)
  has_files = storage.exists(storage.join(directory, "vocab.json")) or storage.exists(
      storage.join(directory, "tokenizer.json"))
  if not has_files:
    vocab_size = tokenizer_config.get("train_vocab_size")
    if not vocab_size:
      raise FileNotFoundError(f"config.tokenizer.directory {directory}: no tokenizer files "
                              "(vocab.json + merges.txt or tokenizer.json) and "
                              "config.tokenizer.train_vocab_size is not set")
    _on_process_zero_then_sync(lambda: tokenizer_lib.train_tokenizer(
        dataset_captions(dataset_dir, tokenizer_config.get("train_on_examples", 20000)),
        vocab_size, directory), "tokenizer")
  return tokenizer_lib.Tokenizer.from_pretrained(directory, tokenizer_config.context_length)
