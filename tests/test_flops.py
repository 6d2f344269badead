"""Per-exit FLOPs and parameters against the original counter's table."""

import json
import subprocess
import sys

import pytest

from l2w_jax.evaluation.flops import count_per_exit
from l2w_jax.models.msdnet import MSDNet
from l2w_jax.reference.fixtures import msdnet_config
from tests.conftest import PROJECT_ROOT, subprocess_env


def test_every_configuration_of_the_reference_table(shared_reference):
  table = json.loads((shared_reference / 'msdnet_counts.json').read_text())
  assert len(table) >= 6
  for name, entry in table.items():
    config = entry['config']
    size = config['image_size']
    ops, params = count_per_exit(MSDNet(msdnet_config(config)),
                                 (size, size, 3))
    for got, want in zip(ops, entry['mflops']):
      assert abs(got / 1e6 - want) <= 1e-3 * want, name
    for got, want in zip(params, entry['mparams']):
      assert abs(got / 1e6 - want) <= 1e-3 * want, name
    assert len(ops) == len(entry['mflops'])
    assert params[-1] == entry['total_params']


def test_flops_command_prints_json_last(shared_reference):
  table = json.loads((shared_reference / 'msdnet_counts.json').read_text())
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.flops',
       '--config=configs/imagenet.py', '--config.model.step=6',
       '--config.model.base=6'], cwd=PROJECT_ROOT, env=subprocess_env(),
      capture_output=True, text=True, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  want = table['imagenet_step6']
  assert result['mflops'] == pytest.approx(want['mflops'], rel=1e-3)
  assert result['mparams'] == pytest.approx(want['mparams'], rel=1e-3)


def test_counting_rules_on_a_hand_counted_network():
  """Two-block CIFAR MSDNet, one scale: counted by hand below."""
  cfg = msdnet_config({'data': 'cifar10', 'nBlocks': 1, 'stepmode': 'even',
                       'step': 1, 'base': 1, 'nChannels': 4, 'growthRate': 2,
                       'grFactor': [1], 'bnFactor': [1], 'bottleneck': False,
                       'reduction': 0.0})
  ops, params = count_per_exit(MSDNet(cfg), (8, 8, 3))
  stem = 3 * 4 * 9 * 64 + 4 * 64  # conv + relu
  layer = 4 * 2 * 9 * 64 + 2 * 64  # 3x3 conv 4 -> 2 at 8x8 + relu
  cls = (6 * 128 * 9 * 16 + 128 * 16 + 128 * 128 * 9 * 4 + 128 * 4 +
         128 * 1 * 4 + 128 * 10 + 10)  # 2 convs + relus, avgpool, linear
  assert ops == [stem + layer + cls]
  p = (3 * 4 * 9 + 8) + (4 * 2 * 9 + 4) + (6 * 128 * 9 + 256 +
                                           128 * 128 * 9 + 256 + 1290)
  assert params == [p]
