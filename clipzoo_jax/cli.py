"""How the command-line tools end: a user error prints one line and exits 1; a bug shows its traceback.

A user error is something the person at the terminal can fix (a missing file, a bad flag, an output
directory made by another job); its message already names the file, field and values, so a
traceback only buries it. `--debug` shows the traceback anyway. Bugs (anything else) keep theirs.

Use `cli.run(main)` in place of `absl.app.run(main)`. It also refuses what absl would silently
accept: a flag given twice (absl keeps the last, so an unquoted brace pattern such as
`--corpus=tar:/d/{0..9}.tar`, which bash expands into ten flags, would label only the last tar) and
leftover positional arguments (the same pattern after `--corpus ` with a space).
"""

from __future__ import annotations

import ast
import collections
import sys
from typing import Callable, Sequence

from absl import app, flags

EXIT_USER_ERROR = 1


class UserError(ValueError):
  """Base of errors a user fixes by changing a flag, a config field or a file (not a bug)."""


# Error types of modules outside this one that are user errors too, matched by name so that this
# module imports none of them (nor TensorFlow or torch through them).
USER_ERROR_NAMES = frozenset({
    "clipzoo_jax.data.records.RecordError",
    "clipzoo_jax.data.shards.ManifestError",
    "clipzoo_jax.convert.errors.ConversionError",  # and its subclasses (TensorFileError)
})


def is_user_error(error: BaseException) -> bool:
  """UserError, a file-system error (missing file, no permission), or one of USER_ERROR_NAMES."""
  if isinstance(error, (UserError, OSError, app.UsageError, flags.Error)):
    return True
  return any(f"{cls.__module__}.{cls.__qualname__}" in USER_ERROR_NAMES
             for cls in type(error).__mro__)


def _flag_name(arg: str) -> str | None:
  """`--name=value`, `--name value`, `-name`, `--noname` -> name (None for positional args)."""
  if not arg.startswith("-") or arg in ("-", "--"):
    return None
  name = arg.lstrip("-").split("=", 1)[0]
  known = flags.FLAGS
  if name not in known and name.startswith("no") and name[2:] in known:
    return name[2:]
  return name


def repeated_flags(argv: Sequence[str]) -> dict[str, list[str]]:
  """Flags given more than once in `argv` (multi-value flags excluded), with their arguments."""
  given = collections.defaultdict(list)
  for arg in argv[1:]:
    if arg == "--":
      break
    name = _flag_name(arg)
    if name is not None:
      given[name].append(arg)
  multi = lambda name: name in flags.FLAGS and isinstance(flags.FLAGS[name], flags.MultiFlag)
  return {name: args for name, args in given.items() if len(args) > 1 and not multi(name)}


def check_arguments(argv: Sequence[str], remaining: Sequence[str], positional: bool) -> None:
  """Raises UserError for a flag given twice, or positional arguments a tool does not take."""
  repeated = repeated_flags(argv)
  if repeated:
    name, args = next(iter(repeated.items()))
    raise UserError(
        f"--{name} given {len(args)} times ({args[0]} ... {args[-1]}); pass it once. An unquoted "
        f"brace or glob pattern is expanded by the shell into one flag per file: quote it, e.g. "
        f"--corpus='tar:/data/{{00000..00331}}.tar'")
  if len(remaining) > 1 and not positional:
    extra = list(remaining[1:])
    raise UserError(f"unexpected arguments {extra[:3]}{' ...' if len(extra) > 3 else ''}: this "
                    "tool takes only --flags. An unquoted pattern after `--flag ` (with a space) is "
                    "expanded by the shell into extra arguments: write --flag='PATTERN'")


def _debug_requested(argv: Sequence[str]) -> bool:
  return any(arg in ("--debug", "-debug", "--debug=true", "--debug=True") for arg in argv)


def _report(error: BaseException) -> int:
  message = str(error).strip() or type(error).__name__
  sys.stderr.write(f"error: {message}\n(run with --debug for the traceback)\n")
  return EXIT_USER_ERROR


def _flag_error_text(error: Exception) -> str:
  """The message of a flag-parsing error. An unknown `--config.key` surfaces as ml_collections'
  AttributeError holding the repr of a KeyError (with its "Did you mean" hint): unwrap it."""
  text = str(error.args[0]) if isinstance(error, (AttributeError, KeyError)) and error.args else str(error)
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      pass
  if isinstance(error, (AttributeError, KeyError)):
    text = f"unknown config key {text}"
  return text


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; a config file's error prints its last line, not its traceback."""
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # noqa: BLE001  (a flag that does not parse is the user's to fix)
    if _debug_requested(argv):
      raise
    lines = [line.strip() for line in _flag_error_text(error).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
      lines = [lines[0], lines[-1]]  # "flag --config=...: Error whilst parsing", the exception
    sys.stderr.write(f"error: {' '.join(lines)}\n(run with --debug for the traceback; "
                     "--helpshort lists the flags)\n")
    sys.exit(EXIT_USER_ERROR)


def wrap(main: Callable[[list[str]], int | None], positional: bool = False,
         argv: Sequence[str] | None = None) -> Callable[[list[str]], int | None]:
  """`main` with its arguments checked and its user errors reported in one line."""
  def wrapped(remaining: list[str]) -> int | None:
    given = list(sys.argv if argv is None else argv)
    try:
      check_arguments(given, remaining, positional)
      return main(remaining)
    except Exception as error:  # noqa: BLE001  (sorted into user errors and bugs)
      if flags.FLAGS["debug"].value or not is_user_error(error):
        raise  # a bug, or --debug: Python prints the traceback and exits 1
      return _report(error)
  return wrapped


def run(main: Callable[[list[str]], int | None], positional: bool = False) -> None:
  """`absl.app.run(main)` with `--debug`, argument checks and one-line user errors; never returns."""
  if "debug" not in flags.FLAGS:
    flags.DEFINE_bool("debug", False, "show the traceback of user errors (missing file, bad flag)")
  app.run(wrap(main, positional), flags_parser=_parse_flags)


def run_argparse(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> None:
  """The same ending for argparse tools: `--debug` anywhere shows the traceback of a user error,
  otherwise it is one line and exit 1; bugs keep their traceback."""
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv
  try:
    main([arg for arg in argv if arg != "--debug"])
  except Exception as error:  # noqa: BLE001  (sorted into user errors and bugs)
    if debug or not is_user_error(error):
      raise
    sys.exit(_report(error))
