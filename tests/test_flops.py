"""Per-exit FLOPs and parameters against the original counter's table."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from l2w_jax.evaluation.flops import count_per_exit
from l2w_jax.models import RANet, pooled_feature_dims
from l2w_jax.models.msdnet import MSDNet
from l2w_jax.reference.fixtures import msdnet_config
from tests.conftest import PROJECT_ROOT, subprocess_env
from tests.tiny import TINY_IMAGE, TINY_RANET


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


@pytest.mark.parametrize('classifier_width,w', [(0, 128), (8, 8)])
def test_counting_rules_on_a_hand_counted_network(classifier_width, w):
  """Two-block CIFAR MSDNet, one scale: counted by hand below; the exit's
  hidden convs are 128 wide (the original's) or model.classifier_width."""
  cfg = msdnet_config({'data': 'cifar10', 'nBlocks': 1, 'stepmode': 'even',
                       'step': 1, 'base': 1, 'nChannels': 4, 'growthRate': 2,
                       'grFactor': [1], 'bnFactor': [1], 'bottleneck': False,
                       'reduction': 0.0})
  cfg = dataclasses.replace(cfg, classifier_width=classifier_width)
  ops, params = count_per_exit(MSDNet(cfg), (8, 8, 3))
  stem = 3 * 4 * 9 * 64 + 4 * 64  # conv + relu
  layer = 4 * 2 * 9 * 64 + 2 * 64  # 3x3 conv 4 -> 2 at 8x8 + relu
  cls = (6 * w * 9 * 16 + w * 16 + w * w * 9 * 4 + w * 4 +
         w * 1 * 4 + w * 10 + 10)  # 2 convs + relus, avgpool, linear
  assert ops == [stem + layer + cls]
  p = (3 * 4 * 9 + 8) + (4 * 2 * 9 + 4) + (6 * w * 9 + 2 * w +
                                           w * w * 9 + 2 * w + w * 10 + 10)
  assert params == [p]
  assert pooled_feature_dims(cfg) == (w,)


def test_classifier_width_of_ranet_exits():
  """model.classifier_width on RANet: every exit's pooled feature (what its
  linear layer and IMTA's heads read) has that width."""
  cfg = dataclasses.replace(TINY_RANET, classifier_width=8)
  model = RANet(cfg)
  x = jnp.zeros((2,) + TINY_IMAGE)
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  kernels = [v['linear']['kernel'] for k, v in variables['params'].items()
             if k.startswith('classifier')]
  assert len(kernels) == cfg.num_exits
  assert all(k.shape == (8, cfg.num_classes) for k in kernels)
  assert pooled_feature_dims(cfg) == (8,) * cfg.num_exits
  with pytest.raises(ValueError, match='model.classifier_width'):
    dataclasses.replace(TINY_RANET, classifier_width=-1)
