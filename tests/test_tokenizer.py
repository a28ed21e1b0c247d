"""CLIP BPE tokenizer: ids against transformers' CLIPTokenizer and an OpenAI-style reference BPE."""

import json
import os
import time

import numpy as np
import pytest
import regex
import transformers

from clipzoo_jax.data import tokenizer as tokenization
from clipzoo_jax.data import toyworld

CAPTIONS = [toyworld.render_scene(0, i, 16).caption for i in range(300)]
EXTRA_TEXTS = ["A  Red SPHERE,\tleft of\na blue box!!", "it's 2024: the cube's colour is 'teal'",
               "Zebra ünïcode 日本 café", "", "   "]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tokenizer"))
  return tokenization.train_tokenizer(CAPTIONS, vocab_size=700, directory=directory), directory


class ReferenceBPE:
  """OpenAI CLIP's simple_tokenizer algorithm, written out from vocab.json + merges.txt."""

  pattern = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                          r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

  def __init__(self, directory):
    with open(os.path.join(directory, "vocab.json"), encoding="utf-8") as f:
      self.encoder = json.load(f)
    with open(os.path.join(directory, "merges.txt"), encoding="utf-8") as f:
      merges = [tuple(line.split()) for line in f.read().splitlines()[1:] if line]
    self.ranks = {merge: rank for rank, merge in enumerate(merges)}
    self.byte_encoder = tokenization.bytes_to_unicode()

  def bpe(self, token):
    word = list(token[:-1]) + [token[-1] + "</w>"]
    while len(word) > 1:
      pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
      best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    return word

  def encode(self, text, context_length):
    text = " ".join(text.split()).lower()
    ids = []
    for token in self.pattern.findall(text):
      token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
      ids += [self.encoder[piece] for piece in self.bpe(token)]
    sot, eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
    ids = [sot] + ids[:context_length - 2] + [eot]
    return ids + [0] * (context_length - len(ids))


def hf_ids(hf_tokenizer, texts, context_length):
  """transformers' ids, with its padding (eot) replaced by our pad id 0."""
  out = hf_tokenizer(list(texts), padding="max_length", truncation=True, max_length=context_length,
                     return_tensors="np")
  return np.where(out["attention_mask"] == 1, out["input_ids"], 0)


def test_layout_shape_specials_and_padding(trained):
  tok, _ = trained
  assert tok.vocab_size <= 700
  assert (tok.sot_token_id, tok.eot_token_id) == (tok.vocab_size - 2, tok.vocab_size - 1)
  assert tok.pad_token_id == 0 and tok.context_length == 77
  ids = tok.encode(CAPTIONS[:8])
  assert ids.shape == (8, 77) and ids.dtype == np.int32
  for row in ids:
    eot = int(np.argmax(row))  # eot has the largest id: argmax pooling finds it
    assert row[0] == tok.sot_token_id and row[eot] == tok.eot_token_id and eot >= 2
    assert (row[1:eot] < tok.sot_token_id).all() and (row[eot + 1:] == 0).all()
  # Frequent words became single tokens.
  vocab = tok.vocab
  assert tok.encode("a red sphere")[0, :6].tolist() == [
      tok.sot_token_id, vocab["a</w>"], vocab["red</w>"], vocab["sphere</w>"], tok.eot_token_id, 0]


def test_round_trip(trained):
  tok, _ = trained
  word = regex.compile(ReferenceBPE.pattern.pattern)
  for text in CAPTIONS[:50] + EXTRA_TEXTS:
    expected = " ".join(word.findall(" ".join(text.split()).lower()))
    assert tok.decode(tok.encode([text])[0]) == expected


def test_truncation_keeps_eot_last(trained):
  tok, _ = trained
  long_text = " and ".join(CAPTIONS[:40])
  full = tokenization.Tokenizer(tok.vocab, tok.merges, context_length=2000).encode(long_text)[0]
  ids = tok.encode([long_text])[0]
  assert ids[-1] == tok.eot_token_id and ids[0] == tok.sot_token_id
  np.testing.assert_array_equal(ids[1:-1], full[1:76])
  short = tokenization.Tokenizer(tok.vocab, tok.merges, context_length=5).encode(["a"])[0]
  assert short.tolist() == [tok.sot_token_id, tok.vocab["a</w>"], tok.eot_token_id, 0, 0]


def test_ids_match_transformers_and_the_reference_bpe(trained):
  tok, directory = trained
  assert sorted(os.listdir(directory)) == ["merges.txt", "special_tokens_map.json",
                                           "tokenizer.json", "tokenizer_config.json", "vocab.json"]
  texts = CAPTIONS[:100] + EXTRA_TEXTS + [" and ".join(CAPTIONS[:30])]
  ours = tok.encode(texts)
  # In transformers 5 CLIPTokenizerFast is CLIPTokenizer (one tokenizers-backed class); both names.
  for cls in (transformers.CLIPTokenizerFast, transformers.CLIPTokenizer):
    np.testing.assert_array_equal(ours, hf_ids(cls.from_pretrained(directory), texts, 77))
  # tokenizer.json on its own (no CLIP-specific rebuild) encodes the same.
  generic = transformers.PreTrainedTokenizerFast(
      tokenizer_file=os.path.join(directory, "tokenizer.json"), pad_token="<|endoftext|>")
  np.testing.assert_array_equal(ours, hf_ids(generic, texts, 77))
  reference = ReferenceBPE(directory)
  np.testing.assert_array_equal(ours, [reference.encode(t, 77) for t in texts])


def tiny_clip_vocabulary():
  merges = [("s", "p"), ("h", "e"), ("sp", "he"), ("r", "e</w>"), ("sphe", "re</w>"),
            ("r", "e"), ("re", "d</w>"), ("b", "o"), ("bo", "x</w>"), ("a", "n</w>")]
  tokens = tokenization.base_vocabulary() + ["".join(m) for m in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  return {t: i for i, t in enumerate(tokens)}, merges


def test_from_pretrained_reads_folders_saved_by_transformers(tmp_path):
  vocab, merges = tiny_clip_vocabulary()
  hf = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
  hf.save_pretrained(str(tmp_path / "hf"))
  texts = ["a red sphere and a red box", "Spheres, boxes: RED!", "an anemone", ""]
  expected = hf_ids(transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "hf")), texts, 16)
  ours = tokenization.Tokenizer.from_pretrained(str(tmp_path / "hf"), context_length=16)
  np.testing.assert_array_equal(ours.encode(texts), expected)
  assert ours.encode(["a red sphere"])[0, :4].tolist() == [
      vocab["<|startoftext|>"], vocab["a</w>"], vocab["red</w>"], vocab["sphere</w>"]]
  # The older layout: vocab.json + merges.txt only.
  legacy = tmp_path / "legacy"
  legacy.mkdir()
  (legacy / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  (legacy / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges),
                                     encoding="utf-8")
  from_legacy = tokenization.Tokenizer.from_pretrained(str(legacy), context_length=16)
  np.testing.assert_array_equal(from_legacy.encode(texts), expected)
  hf_legacy = transformers.CLIPTokenizer.from_pretrained(str(legacy))
  np.testing.assert_array_equal(from_legacy.encode(texts), hf_ids(hf_legacy, texts, 16))


def test_training_is_fast_and_deterministic(tmp_path):
  rng = np.random.default_rng(0)
  def fact():
    phrase = f"{rng.choice(list(toyworld.OBJECT_COLOURS))} {rng.choice(toyworld.DET_CLASSES)}"
    return {"phrase": phrase, "x": rng.random(), "z": rng.uniform(2, 6)}

  facts = [[fact() for _ in range(rng.integers(1, 5))] for _ in range(2000)]
  room = toyworld.render_scene(0, 0, 16).room
  captions = [toyworld.make_caption(rng, f, room) for f in facts]
  start = time.perf_counter()
  tok = tokenization.train_tokenizer(captions, 2000, str(tmp_path / "a"))
  assert time.perf_counter() - start < 2.0
  tokenization.train_tokenizer(captions, 2000, str(tmp_path / "b"))
  for name in ("vocab.json", "merges.txt"):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
  assert tok.vocab_size == len(tok.vocab) and tok.eot_token_id == tok.vocab_size - 1


def test_learn_merges_on_a_textbook_corpus():
  # Sennrich et al.'s example with CLIP's suffix on the last symbol; ties go to the smaller pair.
  merges = tokenization.learn_merges({"low": 5, "lower": 2, "newest": 6, "widest": 3}, 5)
  assert merges == [("e", "s"), ("es", "t</w>"), ("l", "o"), ("e", "w"), ("ew", "est</w>")]
  assert tokenization.learn_merges({"ab": 1, "abc": 1}, 5) == []  # pairs seen once are not merged
  assert tokenization.word_counts(["A red, red <|endoftext|> box's"]) == {
      "a": 1, "red": 2, ",": 1, "box": 1, "'s": 1}


def test_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json or vocab.json"):
    tokenization.Tokenizer.from_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="vocab_size must be >= 514"):
    tokenization.train_tokenizer(CAPTIONS, 100, str(tmp_path))
  vocab, merges = tiny_clip_vocabulary()
  del vocab["<|startoftext|>"]
  with pytest.raises(ValueError, match="special token '<|startoftext|>' missing"):
    tokenization.Tokenizer(vocab, merges)
  with pytest.raises(ValueError, match="one row of ids"):
    tokenization.Tokenizer(*tiny_clip_vocabulary()).decode(np.zeros((2, 3), int))
