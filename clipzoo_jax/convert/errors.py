"""The one error type of conversion, in its own module so that every reader (tensor files, config
files, tokenizers) can raise it without importing the layout table.

A user who converts a file catches `ConversionError` and nothing else: every corrupt, truncated or
mismatched input is reported as one, naming the file and what was wrong with it.
"""

import contextlib


class ConversionError(ValueError):
  """A checkpoint does not fit the run's config or the expected names/shapes; lists every issue."""


@contextlib.contextmanager
def reading(path: str, what: str, error: type = ConversionError,
            hint: str = "truncated or corrupt?"):
  """Any failure while reading `path` becomes one `error` naming the file and what it was read as.

  Corrupt files fail in many ways (EOFError, KeyError, SafetensorError, UnicodeDecodeError, ...);
  a ConversionError raised inside (already naming its file) passes through unchanged.
  """
  try:
    yield
  except ConversionError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    detail = str(e).strip().splitlines()[0] if str(e).strip() else "(no message)"
    raise error(f"{path}: not a readable {what} ({hint}): {type(e).__name__}: {detail}") from e
