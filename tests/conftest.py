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


@pytest.fixture
def float64():
  """jax_enable_x64 for one test (parity checks at 1e-9 and below)."""
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', False)
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


# Modules whose session fixtures train runs that all their tests read: under
# pytest-xdist each runs on one worker, so the fixture trains once.
SHARED_FIXTURE_MODULES = ('tests/test_cascade.py', 'tests/test_evaluate.py',
                          'tests/test_export.py', 'tests/test_options.py',
                          'tests/test_training_loop.py')

try:
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top
except ImportError:  # the suite also runs without pytest-xdist, serially
  LoadScopeScheduling = None

if LoadScopeScheduling is not None:

  class _SharedFixtureScheduling(LoadScopeScheduling):
    """Load balancing test by test, except that the tests of each module in
    SHARED_FIXTURE_MODULES go to one worker together. (xdist's own
    `--dist=loadgroup` marks rely on renaming node ids, which pytest 9 no
    longer allows.)"""

    def _split_scope(self, nodeid: str) -> str:
      module = nodeid.split('::', 1)[0]
      return module if module in SHARED_FIXTURE_MODULES else nodeid

  @pytest.hookimpl(optionalhook=True)  # absent with -p no:xdist
  def pytest_xdist_make_scheduler(config, log):
    return _SharedFixtureScheduling(config, log)


def pytest_collection_modifyitems(items):
  """Tests marked `long` first (stable order otherwise): under pytest-xdist
  the longest ones then overlap the many short ones instead of finishing
  last on one worker."""
  items.sort(key=lambda item: item.get_closest_marker('long') is None)


def subprocess_env() -> dict:
  """The environment of a CLI run by a test: this project importable, CPU,
  and the session's compiler settings, so that the programs it shares with
  in-process tests come from the compilation cache."""
  env = dict(os.environ)
  env['PYTHONPATH'] = str(PROJECT_ROOT)
  env.setdefault('JAX_PLATFORMS', 'cpu')
  env['JAX_DISABLE_MOST_OPTIMIZATIONS'] = '1'
  return env


# Source for the head of a child interpreter's script (`python -c`) in which
# importing TensorFlow or tensorflow_datasets raises (as on a bare serving
# or accelerator host) and every attempt is appended to `attempts`. Finding
# the module still works: JAX's compilation cache (through etils.epath) asks
# `importlib.util.find_spec('tensorflow')` whether it is installed, without
# importing it.
NO_TENSORFLOW = r'''
import importlib.abc
import importlib.machinery
import json
import sys

attempts = []
BLOCKED = ('tensorflow', 'tensorflow_datasets')


class NoTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):

  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      return importlib.machinery.ModuleSpec(name, self)
    return None

  def create_module(self, spec):
    attempts.append(spec.name)
    raise ImportError(f'{spec.name} is not installed on this host')

  def exec_module(self, module):
    raise AssertionError('unreachable')


sys.meta_path.insert(0, NoTensorFlow())
'''
