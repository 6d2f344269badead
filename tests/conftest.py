"""Test-wide settings: tiny models compile fast with most XLA passes off."""

import os
import pathlib

import jax
import pytest

jax.config.update('jax_disable_most_optimizations', True)

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_REFERENCE = PROJECT_ROOT.parent / 'shared' / 'reference'


@pytest.fixture
def shared_reference() -> pathlib.Path:
  """The original's fixtures; tests that need them skip when ../shared is absent."""
  if not SHARED_REFERENCE.is_dir():
    pytest.skip(f'reference fixtures not found at {SHARED_REFERENCE} '
                '(the shared/ folder is not next to the project)')
  return SHARED_REFERENCE


def subprocess_env() -> dict:
  env = dict(os.environ)
  env['PYTHONPATH'] = str(PROJECT_ROOT)
  env.setdefault('JAX_PLATFORMS', 'cpu')
  return env
