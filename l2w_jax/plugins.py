"""Names that registries resolve: `name`, or `module:name` for something a
module outside the package registers when imported."""

from __future__ import annotations

import importlib
import sys


def caller_module(depth: int = 2) -> str:
  """The `__name__` of the module whose code called the function calling
  this one (`depth` frames up): who registers an entry."""
  return sys._getframe(depth).f_globals.get('__name__', '')  # pylint: disable=protected-access


def check_registered_by(name: str, registered_by: str, field: str) -> None:
  """ValueError unless a `module:name` entry was registered by `module`
  (`registered_by`); plain names are not checked."""
  module, _, _ = name.rpartition(':')
  if module and module != registered_by:
    raise ValueError(f'{field}: {name!r}: {module!r} does not register it '
                     f'({registered_by!r} does)')


def import_registering_module(name: str, field: str) -> str:
  """For `module:name`, imports `module` (whose import registers `name`)
  and returns `name`; a plain name is returned as it is.

  Args:
    name: the config value, e.g. 'examples.shallow_deep:sdn'.
    field: the config field it came from, for the error message.

  Returns:
    The registered name. ValueError naming the field if the module cannot
    be imported.
  """
  module, _, registered = name.rpartition(':')
  if module:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise ValueError(f'{field}: cannot import {module!r} for {name!r} '
                       f'({e}); run from the directory that holds it or put '
                       'it on PYTHONPATH') from e
  return registered
