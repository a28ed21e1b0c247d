"""Which token the text tower pools, and the checks that the choice can work.

Our text tower pools the first `model.text.eos_token_id` of each caption, or the largest id when it
is None (OpenAI's argmax pooling, right when end-of-text is the tokenizer's largest id). Hugging
Face states the same in `text_config.eos_token_id` (2 meaning argmax, a legacy convention),
open_clip in `text_cfg.pool_type` and `eos_id`. An id outside the vocabulary never occurs in a
caption, so every caption would pool position 0 and all text embeddings would be the same: import
and export refuse it, suggesting only a value that works (the tokenizer's end-of-text id, when it
is known).
"""

from __future__ import annotations

import dataclasses
import json

from clipzoo_jax import storage
from clipzoo_jax.convert import errors

EOT = "<|endoftext|>"  # clipzoo_jax.data.tokenizer.EOT, OpenAI's and Hugging Face's CLIP tokenizers


@dataclasses.dataclass(frozen=True)
class TokenizerIds:
  """What pooling needs to know of a tokenizer: its end-of-text id and its largest id."""
  eot: int | None
  largest: int
  origin: str


def _vocabulary(path: str) -> dict:
  with errors.reading(path, "tokenizer file"):
    data = json.loads(storage.read_text(path))
  if path.endswith("tokenizer.json"):
    model = data.get("model") if isinstance(data, dict) else None
    vocab = dict(model.get("vocab") or {}) if isinstance(model, dict) else None
    for added in (data.get("added_tokens") or []) if vocab is not None else []:
      if isinstance(added, dict) and "content" in added and "id" in added:
        vocab[added["content"]] = added["id"]
  else:
    vocab = data
  if not isinstance(vocab, dict) or not vocab or not all(
      isinstance(i, int) for i in vocab.values()):
    raise errors.ConversionError(f"{path}: expected a vocabulary of token -> integer id, found "
                                 f"{type(vocab).__name__} with {len(vocab or ())} entries")
  return vocab


def read_tokenizer_ids(directory: str) -> TokenizerIds | None:
  """The tokenizer ids of a folder's `tokenizer.json` (preferred, as transformers) or
  `vocab.json`; None when it has neither."""
  for name in ("tokenizer.json", "vocab.json"):
    path = storage.join(directory, name)
    if storage.exists(path):
      vocab = _vocabulary(path)
      return TokenizerIds(vocab.get(EOT), max(vocab.values()), path)
  return None


def _suggestion(field: str, vocab_size: int, tokenizer: TokenizerIds | None,
                argmax_value: str) -> str:
  if tokenizer is not None and tokenizer.eot is not None and 0 <= tokenizer.eot < vocab_size:
    argmax = (f" (or {argmax_value}: argmax pooling, the same here since it is the tokenizer's "
              "largest id)" if tokenizer.eot == tokenizer.largest else "")
    return f"set {field} to {tokenizer.eot}, the {EOT} id of {tokenizer.origin}{argmax}"
  if tokenizer is not None:
    return (f"{tokenizer.origin} does not fit this model either (its {EOT} id is "
            f"{tokenizer.eot}, its largest id {tokenizer.largest}); use the model's own tokenizer")
  return (f"set {field} to the end-of-text id of the tokenizer the model was trained with (an id "
          f"below {vocab_size}), or to {argmax_value} (argmax pooling) if that id is the "
          "tokenizer's largest")


def eos_problems(eos: int | None, vocab_size: int, field: str,
                 tokenizer: TokenizerIds | None = None, argmax_value: str = "None") -> list[str]:
  """Why pooling at `eos` (None: argmax) cannot work with this vocabulary and tokenizer; each
  problem names `field` and, when one is known, a value that works."""
  problems = []
  if tokenizer is not None and tokenizer.largest >= vocab_size:
    problems.append(f"{tokenizer.origin}: ids go up to {tokenizer.largest}, outside the model's "
                    f"vocabulary of {vocab_size}")
  if eos is None:
    if tokenizer is not None and tokenizer.eot is not None and tokenizer.eot != tokenizer.largest:
      problems.append(f"{field}: {argmax_value} pools the largest id, but {tokenizer.origin} ends "
                      f"text with {tokenizer.eot}, not its largest id {tokenizer.largest}; "
                      f"{_suggestion(field, vocab_size, tokenizer, argmax_value)}")
  elif not 0 <= eos < vocab_size:
    problems.append(f"{field}: {eos} is outside the vocabulary (vocab_size {vocab_size}), so no "
                    "caption contains it and every caption would pool position 0 (identical text "
                    f"embeddings); {_suggestion(field, vocab_size, tokenizer, argmax_value)}")
  elif tokenizer is not None and tokenizer.eot is not None and eos != tokenizer.eot:
    problems.append(f"{field}: {eos}, but {tokenizer.origin} ends text with {EOT} = "
                    f"{tokenizer.eot}; {_suggestion(field, vocab_size, tokenizer, argmax_value)}")
  return problems


def check_eos(eos: int | None, vocab_size: int, field: str,
              tokenizer: TokenizerIds | None = None, argmax_value: str = "None") -> None:
  """Raises ConversionError listing `eos_problems`, if any."""
  problems = eos_problems(eos, vocab_size, field, tokenizer, argmax_value)
  if problems:
    raise errors.ConversionError("text pooling cannot work:\n  " + "\n  ".join(problems))
