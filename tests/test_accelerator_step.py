"""benchmarks.accelerator_step runs without TensorFlow and prints its figures."""

import json
import subprocess
import sys

import pytest

from tests.conftest import NO_TENSORFLOW, PROJECT_ROOT, subprocess_env

# A fresh interpreter in which importing TensorFlow (or tfds) raises, as on
# a bare accelerator host; runs the benchmark and prints the attempts last.
_CHILD = NO_TENSORFLOW + r'''
import runpy
sys.argv = ['accelerator_step'] + sys.argv[1:]
try:
  runpy.run_module('benchmarks.accelerator_step', run_name='__main__')
except SystemExit as e:
  assert not e.code, e.code
print(json.dumps({'tensorflow_imports': attempts}))
'''

# The CIFAR-100 MSDNet config shrunk to a model that compiles in seconds.
_TINY = ('model.n_blocks=2', 'model.n_channels=4', 'model.growth_rate=2',
         'model.gr_factor=(1,2)', 'model.bn_factor=(1,2)', 'model.step=1',
         'model.base=1', 'dataset.image_size=16', 'meta.hidden_size=8')


@pytest.mark.long
def test_accelerator_step_prints_throughput_without_tensorflow():
  run = subprocess.run(
      [sys.executable, '-c', _CHILD, '--configs=configs/cifar100.py',
       '--dtypes=float32,bfloat16', '--batch_size=4', '--iterations=2'] +
      [f'--override={o}' for o in _TINY],
      cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True,
      timeout=600, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  lines = [json.loads(line) for line in run.stdout.splitlines()
           if line.startswith('{')]
  assert lines[-1] == {'tensorflow_imports': []}
  figures = lines[:-1]
  assert [(f['config'], f['dtype']) for f in figures] == [
      ('configs/cifar100.py', 'float32'), ('configs/cifar100.py', 'bfloat16')]
  for f in figures:
    assert f['image_size'] == 16 and f['per_device_batch'] == 4
    assert f['global_batch'] == 4 * f['devices']
    for kind in ('plain', 'l2w'):
      assert f[f'{kind}_images_per_second'] > 0
      assert f[f'{kind}_compile_s'] > 0  # the cache is off: real compiles
      assert (f[f'{kind}_images_per_second'] ==
              round(f['global_batch'] / f[f'{kind}_step_s'], 1))
