"""The persistent compilation cache: a second run compiles nothing."""

import json
import os
import subprocess
import sys

import jax

from l2w_jax import compilation
from tests.conftest import PROJECT_ROOT, subprocess_env


def test_cache_directory_precedence(monkeypatch, tmp_path):
  for name in compilation.ENV_VARS + ('XDG_CACHE_HOME',):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('HOME', str(tmp_path))
  assert compilation.cache_directory() == str(
      tmp_path / '.cache' / 'l2w_jax' / 'xla')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert compilation.cache_directory() == str(tmp_path / 'xdg' / 'l2w_jax' /
                                              'xla')
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '/jax')
  assert compilation.cache_directory() == '/jax'
  monkeypatch.setenv('L2W_JAX_COMPILATION_CACHE', '/ours')
  assert compilation.cache_directory() == '/ours'
  assert compilation.cache_directory('/flag') == '/flag'
  for off in ('none', 'off', ''):
    assert compilation.cache_directory(off) is None


def test_compile_log_counts_programs():
  with compilation.CompileLog() as log:
    jax.jit(lambda x: x * 3.0 + 1.0)(jax.numpy.arange(7.0)).block_until_ready()
  assert log.programs >= 1 and log.seconds > 0
  assert log.summary()['programs'] == log.programs
  before = log.programs
  jax.jit(lambda x: x * 5.0)(jax.numpy.arange(3.0))  # not listening now
  assert log.programs == before


def _train(workdir, cache, data_dir):
  env = subprocess_env()
  env.pop('JAX_COMPILATION_CACHE_DIR', None)  # the suite's shared cache
  env['L2W_JAX_COMPILATION_CACHE'] = str(cache)
  run = subprocess.run(
      [sys.executable, '-m', 'experiments.main',
       '--config=tests/tiny_digits_config.py', f'--workdir={workdir}',
       f'--config.dataset.data_dir={data_dir}'], cwd=PROJECT_ROOT, env=env,
      capture_output=True, text=True, timeout=600, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f'compilation cache: {cache}' in run.stdout
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f), run.stdout


def test_a_second_run_in_a_fresh_workdir_loads_every_program(tmp_path):
  """Two runs of one config in two workdirs, one cache: the first compiles
  (cache misses), the second finds all programs of its start-up in the
  cache (no miss) and says so."""
  cache, data_dir = tmp_path / 'cache', tmp_path / 'data'
  first, _ = _train(tmp_path / 'one', cache, data_dir)
  second, log = _train(tmp_path / 'two', cache, data_dir)
  assert first['compilation']['cache_misses'] > 0
  assert second['compilation']['cache_misses'] == 0, second['compilation']
  assert second['compilation']['cache_hits'] >= first['compilation'][
      'cache_misses']
  assert 0 < second['startup_s'] and 0 < first['startup_s']
  assert 'first iteration done' in log and 'from the persistent' in log
  assert first['params_sha256'] == second['params_sha256']
  assert any(cache.iterdir())
