"""CLIP's byte-level BPE tokenizer on the `tokenizers` library: encode to fixed-length ids, decode,
load a Hugging Face CLIP tokenizer folder, and train a small one on captions.

Ids follow OpenAI CLIP: `<|startoftext|>` tokens `<|endoftext|>`, then padding with id 0. Hugging
Face's `CLIPTokenizer` pads with the eot id instead; both give the same text embeddings, because
the causal mask keeps every position up to the first eot blind to what follows it, and pooling
reads the first eot (or the argmax id, which is the first eot when the special tokens are last in
the vocabulary, as here and in OpenAI's vocabulary). Only the pad value differs.
"""

from __future__ import annotations

import collections
import heapq
import json
from typing import Iterable, Mapping, Sequence

import numpy as np
import tokenizers
from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors

from clipzoo_jax import storage

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
END_OF_WORD = "</w>"
PAD_TOKEN_ID = 0
# OpenAI CLIP's word pattern (simple_tokenizer.py), as transformers' CLIPTokenizer uses it.
WORD_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
                r"""|[^\s\p{L}\p{N}]+""")
MERGES_HEADER = "#version: 0.2"


def bytes_to_unicode() -> dict[int, str]:
  """OpenAI's byte -> printable character table: the 256 base symbols of byte-level BPE."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  codes = printable[:]
  extra = 0
  for byte in range(256):
    if byte not in printable:
      printable.append(byte)
      codes.append(256 + extra)
      extra += 1
  return {byte: chr(code) for byte, code in zip(printable, codes)}


def base_vocabulary() -> list[str]:
  """CLIP's first 512 tokens: every byte symbol, then every byte symbol ending a word."""
  symbols = list(bytes_to_unicode().values())
  return symbols + [symbol + END_OF_WORD for symbol in symbols]


def _normalizer():
  return normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                               normalizers.Lowercase()])


def _pre_tokenizer():
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
  ])


def build_backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> tokenizers.Tokenizer:
  """The same pipeline as transformers' CLIPTokenizer, so ids match it exactly."""
  backend = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD,
      fuse_unk=False, unk_token=EOT))
  backend.normalizer = _normalizer()
  backend.pre_tokenizer = _pre_tokenizer()
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens([tokenizers.AddedToken(SOT, special=True, normalized=False),
                              tokenizers.AddedToken(EOT, special=True, normalized=False)])
  backend.post_processor = processors.RobertaProcessing(
      (EOT, vocab[EOT]), (SOT, vocab[SOT]), trim_offsets=False, add_prefix_space=False)
  return backend


class Tokenizer:
  """Texts -> (B, context_length) int32 ids: sot, BPE tokens, eot, then pad id 0.

  Text is NFC-normalized, lowercased and its whitespace collapsed (as transformers'
  CLIPTokenizer; OpenAI's additional ftfy/html-unescape pass changes nothing on plain text).
  Truncation keeps sot first and eot last.
  """

  pad_token_id = PAD_TOKEN_ID

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]],
               context_length: int = 77, source: str = "<in memory>"):
    for token in (SOT, EOT):
      if token not in vocab:
        raise ValueError(f"{source}: special token {token!r} missing from the vocabulary "
                         f"of {len(vocab)} tokens; expected both {SOT!r} and {EOT!r}")
    if context_length < 2:
      raise ValueError(f"context_length must be >= 2 (sot and eot), found {context_length}")
    self.vocab = dict(vocab)
    self.merges = [tuple(merge) for merge in merges]
    self.context_length = context_length
    self.sot_token_id = self.vocab[SOT]
    self.eot_token_id = self.vocab[EOT]
    self.vocab_size = max(self.vocab.values()) + 1
    self._backend = build_backend(self.vocab, self.merges)
    self._id_to_token = {i: token for token, i in self.vocab.items()}
    self._byte_decoder = {char: byte for byte, char in bytes_to_unicode().items()}

  def encode(self, texts: Sequence[str] | str) -> np.ndarray:
    """Ids (B, context_length) int32; a single string is a batch of one."""
    if isinstance(texts, str):
      texts = [texts]
    encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
    ids = np.full((len(encodings), self.context_length), self.pad_token_id, np.int32)
    keep = self.context_length - 2
    for row, encoding in enumerate(encodings):
      tokens = [self.sot_token_id] + encoding.ids[:keep] + [self.eot_token_id]
      ids[row, :len(tokens)] = tokens
    return ids

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of one row of ids: stops at the first eot, drops sot; words joined by single spaces."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
      raise ValueError(f"decode takes one row of ids (1-D), found shape {ids.shape}")
    ids = ids.tolist()
    if self.eot_token_id in ids:
      ids = ids[:ids.index(self.eot_token_id)]
    text = "".join(self._id_to_token[i] for i in ids if i != self.sot_token_id)
    # As OpenAI's decode: "</w>" is itself made of byte symbols, so decode bytes first.
    text = bytearray(self._byte_decoder[char] for char in text).decode("utf-8", errors="replace")
    return " ".join(text.replace(END_OF_WORD, " ").split())

  @classmethod
  def from_pretrained(cls, directory: str, context_length: int = 77) -> "Tokenizer":
    """Loads a Hugging Face CLIP tokenizer folder (`tokenizer.json`, or vocab.json + merges.txt)."""
    vocab, merges, source = read_vocab_and_merges(directory)
    return cls(vocab, merges, context_length, source=source)

  def save_pretrained(self, directory: str) -> list[str]:
    """Writes the Hugging Face CLIP folder layout; returns the file paths."""
    storage.makedirs(directory)
    files = {
        "vocab.json": json.dumps(self.vocab, ensure_ascii=False),
        "merges.txt": "\n".join([MERGES_HEADER] + [f"{a} {b}" for a, b in self.merges]) + "\n",
        "tokenizer.json": self._backend.to_str(),
        "tokenizer_config.json": json.dumps(self._hf_config(), indent=2),
        "special_tokens_map.json": json.dumps(self._special_tokens(), indent=2),
    }
    paths = []
    for name, text in files.items():
      path = storage.join(directory, name)
      storage.write_text(path, text)
      paths.append(path)
    return paths

  def _special_tokens(self) -> dict:
    # Hugging Face's CLIP convention (pad = eot); our own encode pads with id 0, see the docstring.
    return {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}

  def _hf_config(self) -> dict:
    return {"tokenizer_class": "CLIPTokenizer", "backend": "tokenizers",
            "model_max_length": self.context_length, "clean_up_tokenization_spaces": False,
            **self._special_tokens()}


def _read_tokenizer_json(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
  model = json.loads(storage.read_text(path)).get("model", {})
  if model.get("type") != "BPE":
    raise ValueError(f"{path}: model.type expected 'BPE' (a CLIP tokenizer), "
                     f"found {model.get('type')!r}")
  if model.get("end_of_word_suffix") != END_OF_WORD:
    raise ValueError(f"{path}: model.end_of_word_suffix expected {END_OF_WORD!r} (CLIP BPE), "
                     f"found {model.get('end_of_word_suffix')!r}")
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
  return dict(model["vocab"]), merges


def _read_vocab_merges_files(vocab_path: str, merges_path: str):
  vocab = json.loads(storage.read_text(vocab_path))
  merges = []
  for number, line in enumerate(storage.read_text(merges_path).split("\n"), 1):
    line = line.rstrip("\r")
    if not line or line.startswith("#version"):
      continue
    pair = line.split(" ")
    if len(pair) != 2:
      raise ValueError(f"{merges_path}:{number}: a merge is two tokens separated by one "
                       f"space, found {line!r}")
    merges.append(tuple(pair))
  return vocab, merges


def read_vocab_and_merges(directory: str) -> tuple[dict[str, int], list[tuple[str, str]], str]:
  """Vocabulary and merges of a CLIP tokenizer folder, local or in a bucket (`storage`);
  `tokenizer.json` wins, as in transformers."""
  tokenizer_json = storage.join(directory, "tokenizer.json")
  vocab_path = storage.join(directory, "vocab.json")
  merges_path = storage.join(directory, "merges.txt")
  if storage.exists(tokenizer_json):
    return (*_read_tokenizer_json(tokenizer_json), tokenizer_json)
  if storage.exists(vocab_path) and storage.exists(merges_path):
    return (*_read_vocab_merges_files(vocab_path, merges_path), vocab_path)
  if storage.isdir(directory):
    found = sorted(storage.basename(p) for p in storage.glob(storage.join(directory, "*")))
  else:
    found = storage.bucket_problem(directory) or "no such directory"
  raise FileNotFoundError(f"{directory}: expected a CLIP tokenizer folder with tokenizer.json or "
                          f"vocab.json + merges.txt; found {found}")


def word_counts(texts: Iterable[str]) -> collections.Counter:
  """Byte-level words of `texts` (normalized and split as at encoding time) and their counts."""
  normalizer, pre_tokenizer = _normalizer(), _pre_tokenizer()
  counts = collections.Counter()
  for text in texts:
    # Special tokens in a text are matched whole at encoding time, never split into words.
    text = normalizer.normalize_str(text.replace(SOT, " ").replace(EOT, " "))
    counts.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(text))
  return counts


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
  merged, i = [], 0
  while i < len(symbols):
    if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
      merged.append(symbols[i] + symbols[i + 1])
      i += 2
    else:
      merged.append(symbols[i])
      i += 1
  return merged


def learn_merges(counts: Mapping[str, int], num_merges: int,
                 min_frequency: int = 2) -> list[tuple[str, str]]:
  """Greedy BPE with CLIP's end-of-word suffix: merge the most frequent adjacent pair, repeat.

  Ties go to the smaller pair in string order, so training is deterministic (the `tokenizers`
  trainer breaks ties by hash order and can learn different merges run to run).
  """
  words = [list(word[:-1]) + [word[-1] + END_OF_WORD] for word in counts]
  freqs = list(counts.values())
  pair_counts: collections.Counter = collections.Counter()
  where = collections.defaultdict(set)
  for i, symbols in enumerate(words):
    for pair in zip(symbols, symbols[1:]):
      pair_counts[pair] += freqs[i]
      where[pair].add(i)
  heap = [(-count, pair) for pair, count in pair_counts.items()]
  heapq.heapify(heap)
  merges, done = [], set()
  while heap and len(merges) < num_merges:
    negative, pair = heapq.heappop(heap)
    if pair in done or pair_counts.get(pair, 0) != -negative:
      continue  # a stale heap entry: the count changed after it was pushed
    if -negative < min_frequency:
      break
    merges.append(pair)
    done.add(pair)
    for i in sorted(where.pop(pair)):
      old, new = words[i], _merge_pair(words[i], pair)
      if len(new) == len(old):
        continue
      words[i] = new
      for p in zip(old, old[1:]):
        pair_counts[p] -= freqs[i]
      for p in zip(new, new[1:]):
        pair_counts[p] += freqs[i]
        where[p].add(i)
      for p in set(zip(old, old[1:])) | set(zip(new, new[1:])):
        if pair_counts[p] > 0:
          heapq.heappush(heap, (-pair_counts[p], p))
  return merges


def train_tokenizer(texts: Iterable[str], vocab_size: int, directory: str,
                    context_length: int = 77) -> Tokenizer:
  """Trains a CLIP-layout BPE on `texts` and saves it as a Hugging Face CLIP folder.

  Vocabulary order is OpenAI's: 256 byte symbols, the same 256 ending a word, one token per merge,
  then sot and eot last (sot = vocab_size - 2, eot = vocab_size - 1). `vocab_size` is an upper
  bound: a small corpus may run out of pairs seen twice, and the returned tokenizer's vocab_size
  is the true size a text tower must be built with.
  """
  base = base_vocabulary()
  if vocab_size < len(base) + 2:
    raise ValueError(f"train_tokenizer: vocab_size must be >= {len(base) + 2} (byte symbols "
                     f"and the two special tokens), found {vocab_size}")
  tokens = list(base)
  seen = set(tokens)
  merges = []
  for a, b in learn_merges(word_counts(texts), vocab_size - len(base) - 2):
    merges.append((a, b))
    if a + b not in seen:  # two merge paths can spell the same token; it keeps its first id
      seen.add(a + b)
      tokens.append(a + b)
  tokens += [SOT, EOT]
  tokenizer = Tokenizer({token: i for i, token in enumerate(tokens)}, merges, context_length,
                        source=directory)
  tokenizer.save_pretrained(directory)
  return Tokenizer.from_pretrained(directory, context_length)


class WordHashTokenizer:
  """A stand-in for a trained tokenizer in tests and loader benchmarks: whitespace words hashed
  (crc32, stable across processes) into `vocab_size` ids, 0-padded to `context_length`. Light to
  import and to pickle into loader worker processes."""

  pad_token_id = PAD_TOKEN_ID

  def __init__(self, context_length: int = 6, vocab_size: int = 997):
    self.context_length, self.vocab_size = int(context_length), int(vocab_size)

  def encode(self, texts: Sequence[str] | str) -> np.ndarray:
    import zlib  # pylint: disable=import-outside-toplevel
    if isinstance(texts, str):
      texts = [texts]
    out = np.zeros((len(texts), self.context_length), np.int32)
    for row, text in enumerate(texts):
      ids = [zlib.crc32(w.encode()) % (self.vocab_size - 1) + 1
             for w in text.split()][:self.context_length]
      out[row, :len(ids)] = ids
    return out
