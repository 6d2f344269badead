"""Names that registries resolve: `name`, or `module:name` for something a
module outside the package registers when imported."""

from __future__ import annotations

import importlib


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
