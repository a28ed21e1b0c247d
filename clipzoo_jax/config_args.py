"""big_vision-style config arguments: `configs/cliptex.py:variant=B/16,tasks=seg+depth,runlocal`."""

from __future__ import annotations

import ast

import ml_collections
from absl import flags
from ml_collections import config_flags

from clipzoo_jax import cli


def _convert(text: str, default):
  if isinstance(default, bool):
    if text.lower() in ("", "true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise cli.UserError(f"config arg: expected a boolean, found {text!r}")
  if isinstance(default, int):
    return int(text)
  if isinstance(default, float):
    return float(text)
  return text


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'a=1,b,c=x' -> ConfigDict typed like the defaults; a bare name means True. Unknown names are
  an error listing the known ones."""
  result = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    name, _, value = item.partition("=")
    if name not in defaults:
      raise cli.UserError(f"config arg {name!r} is unknown; known args: {sorted(defaults)}")
    result[name] = _convert(value if "=" in item else "true", defaults[name])
  return ml_collections.ConfigDict(result)


def parse_tasks(text: str) -> list[str]:
  """'seg+depth' -> ['seg', 'depth']; 'none' -> [] (the CLIP-FT baseline)."""
  return [] if text in ("", "none") else text.split("+")


class ListParser(flags.ArgumentParser):
  """`--config.mesh='[1,8,1]'`: list-valued config keys from the command line, as Python literals
  (ml_collections parses tuples but refuses lists)."""

  def parse(self, argument):
    if isinstance(argument, (list, tuple)):
      return list(argument)
    try:
      value = ast.literal_eval(argument)
    except (ValueError, SyntaxError) as error:
      raise ValueError(f"expected a Python list literal such as '[1, 8, 1]', found {argument!r} "
                       f"({error.__class__.__name__})") from None
    if not isinstance(value, (list, tuple)):
      raise ValueError(f"expected a list such as '[1, 8, 1]', found {argument!r}")
    return list(value)

  def flag_type(self):
    return "list"


def allow_list_overrides() -> None:
  """Lets `--config.KEY=[...]` override list-valued keys (call before flags are parsed)."""
  config_flags.register_flag_parser_for_type(list, ListParser())
