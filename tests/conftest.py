"""Test-wide settings: tiny models compile fast with most XLA passes off."""

import os
import pathlib
import tempfile

import jax
import pytest

jax.config.update('jax_disable_most_optimizations', True)
# Data-parallel tests run on 8 simulated CPU devices; everything else uses
# the first one. Must happen before any JAX computation.
jax.config.update('jax_num_cpu_devices', 8)
# Many tests compile the same tiny programs (every train_and_evaluate call
# builds fresh jitted steps): a compilation cache shared by the session and
# its subprocesses compiles each once.
_CACHE = os.environ.setdefault(
    'JAX_COMPILATION_CACHE_DIR',
    os.path.join(tempfile.gettempdir(), f'l2w_jax_test_cache_{os.getuid()}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_REFERENCE = PROJECT_ROOT.parent / 'shared' / 'reference'


@pytest.fixture
def shared_reference() -> pathlib.Path:
  """The original's fixtures. Tests that need them skip when ../shared is
  absent, except under CI (`CI` set), where a missing fixture is a failure:
  a CI run that lost the comparisons with the original must not stay green."""
  if not SHARED_REFERENCE.is_dir():
    message = (f'reference fixtures not found at {SHARED_REFERENCE} (the '
               'shared/ folder is not next to the project)')
    if os.environ.get('CI'):
      pytest.fail(message + '; under CI they are required')
    pytest.skip(message)
  return SHARED_REFERENCE


def subprocess_env() -> dict:
  env = dict(os.environ)
  env['PYTHONPATH'] = str(PROJECT_ROOT)
  env.setdefault('JAX_PLATFORMS', 'cpu')
  return env
