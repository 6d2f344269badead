"""RANet: the original's FLOPs table, its bilinear resizing, configuration
errors, and training and evaluation on the embedded digits."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, digits, ranet_cifar10
from l2w_jax.evaluation.flops import count_per_exit
from l2w_jax.models import backbone_config, ranet
from l2w_jax.reference.fixtures import ranet_config
from l2w_jax.training import train
from tests.conftest import PROJECT_ROOT, subprocess_env
from tests.tiny import tiny_train_config


def test_every_configuration_of_the_reference_table(shared_reference):
  table = json.loads((shared_reference / 'ranet_counts.json').read_text())
  assert len(table) == 2
  for name, row in table.items():
    cfg = ranet_config(row['config'])
    size = 32 if cfg.stem == 'cifar' else 224
    mflops, mparams = count_per_exit(ranet.RANet(cfg), (size, size, 3))
    assert len(mflops) == cfg.num_exits == 8, name
    np.testing.assert_allclose(np.asarray(mflops) / 1e6, row['mflops'],
                               rtol=1e-3, err_msg=name)
    np.testing.assert_allclose(np.asarray(mparams) / 1e6, row['mparams'],
                               rtol=1e-3, err_msg=name)


def test_bilinear_resize_aligns_the_corners():
  x = jnp.array([[0.0, 1.0], [2.0, 3.0]])[None, :, :, None]
  up = ranet.interpolate_bilinear(x, (3, 3))[0, :, :, 0]
  np.testing.assert_allclose(up, [[0, 0.5, 1], [1, 1.5, 2], [2, 2.5, 3]],
                             atol=1e-7)
  down = ranet.interpolate_bilinear(up[None, :, :, None], (2, 2))[0, :, :, 0]
  np.testing.assert_allclose(down, [[0, 1], [2, 3]], atol=1e-7)
  five = ranet.interpolate_bilinear(x, (5, 4))[0, :, :, 0]
  # Row i samples 0.25 i, column j samples j / 3.
  np.testing.assert_allclose(five[1, 2], (1 - 0.25) * (2 / 3) + 0.25 * (
      2 + 2 / 3), atol=1e-6)


def test_topology_follows_the_original_channel_arithmetic():
  flows = ranet.ranet_topology(ranet.RANetConfig())
  assert [len(f) for f in flows] == [2, 4, 6, 8]
  assert [[b.kind for b in f] for f in flows][1] == ['up', 'up', 'norm',
                                                     'norm']
  assert [b.down for b in flows[2]] == [False, True, False, True, False,
                                        False]
  first = flows[0][0]  # 64 + 4 x 24, no transition
  assert first.outputs == (64, 88, 112, 136, 160, 160)
  fused = flows[1][0]  # 32 + 4 x 12 = 80, + floor(80 / 4)
  assert fused.outputs == (32, 44, 56, 68, 80, 100) and not fused.trans
  # 100 + 4 x 12 = 148, + floor(148 / 4) = 185, halved by the transition.
  assert flows[1][1].outputs[-1] == 92 and flows[1][1].trans
  assert flows[1][1].down and flows[1][1].low_widths == (160, 184, 208, 232,
                                                         256)


@pytest.mark.parametrize('field,value,message', [
    ('block_step', 0, 'model.scale_list, model.n_blocks, model.block_step'),
    ('scale_list', (1, 3, 3), 'model.scale_list: must start at 1'),
    ('gr_factor', (4, 2), 'model.gr_factor: has 2 entries'),
    ('growth_rate', 1, 'model.compress_factor, model.growth_rate'),
    ('step_mode', 'lin_grow', "unknown RANet step mode 'lin_grow'"),
    ('ensemble_reweight', (0.5, 0.5), r'model.ensemble_reweight: needs one '
     r'value per exit \(6\)'),
])
def test_configurations_that_do_not_fit_are_named(field, value, message):
  fields = {'gr_factor': (4, 2, 1), 'bn_factor': (4, 2, 1),
            'scale_list': (1, 2, 3), field: value}
  with pytest.raises(ValueError, match=message):
    ranet.RANetConfig(**fields)


def _small_digits_ranet(tmp_path, method, num_steps=2):
  """tiny_train_config's digits run with a 3-exit RANet on 32 px."""
  config = tiny_train_config('sklearn_digits', num_steps=num_steps,
                             method=method)
  config.dataset.data_dir = str(tmp_path / 'data')
  model = config.model
  model.name = 'ranet'
  model.n_blocks, model.block_step, model.step = 1, 1, 2
  model.scale_list, model.gr_factor, model.bn_factor = (1, 2, 3), (4, 2, 1), (
      4, 2, 1)
  model.n_channels, model.growth_rate, model.init = 2, 4, 'msdnet'
  return config


@pytest.mark.long
@pytest.mark.parametrize('method', ['l2w', 'uniform'])
def test_training_and_evaluation_on_a_small_ranet(tmp_path, method):
  config = _small_digits_ranet(tmp_path, method)
  if method == 'l2w':  # the sharded step (2 devices, 4 images each)
    config.distributed.num_devices = 2
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['num_devices'] == config.distributed.num_devices
  assert len(results['anytime']['top1']) == 3  # 1 + 1 + 1 blocks with exits
  assert len(results['budgeted']) == 39
  mflops = results['mflops_per_exit']
  assert mflops == sorted(mflops) and mflops[0] > 0


def test_state_dict_names_are_the_originals(shared_reference):
  """Every parameter and buffer of the original's CIFAR-10 RANet, and no
  other, under the same name; the conversion round trip is exact."""
  from l2w_jax.convert.torch_state import (flax_to_torch, torch_to_flax,  # pylint: disable=g-import-not-at-top
                                           variables_template)
  with np.load(shared_reference / 'ranet_cifar10_forward.npz') as data:
    original = {k[len('model/'):]: data[k] for k in data.files
                if k.startswith('model/')}
    config = json.loads(str(data['config_json']))
  model = ranet.RANet(ranet_config(config))
  # The template is the module's own variables: torch_to_flax refuses any
  # missing, unexpected or misshapen entry.
  template = variables_template(model, jnp.zeros((1, 32, 32, 3)))
  variables = torch_to_flax(original, template)
  back = flax_to_torch(variables)
  assert set(back) == set(original)
  for name, value in original.items():
    if value.dtype.kind == 'f':
      np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_switching_to_ranet_on_the_command_line_takes_its_preset():
  """`--config.model.name=ranet` on an MSDNet config file: the RANet preset
  of the dataset, with the command line's other model fields kept; the
  same name as the file's changes nothing."""
  config = digits.get_config()
  config.model.name, config.model.step = 'ranet', 3
  assert common.switch_backbone(config, 'msdnet', {'model.name': 'ranet',
                                                   'model.step': 3})
  preset = common.MODEL_PRESETS['ranet', 'digits']
  assert {f: config.model[f] for f in preset} == {**preset, 'step': 3}
  assert backbone_config(config).num_exits == 4
  own = ranet_cifar10.get_config()
  own.model.step = 2
  assert not common.switch_backbone(own, 'ranet', {'model.name': 'ranet'})
  assert own.model.step == 2
  assert not common.switch_backbone(own, 'msdnet', {'model.step': 2})


def test_imagenet_ranet_from_the_command_line_counts_like_the_original(
    shared_reference):
  """`experiments.flops --config=configs/imagenet.py
  --config.model.name=ranet`: the original's train_imagenet.sh RANet,
  built and counted without data."""
  table = json.loads((shared_reference / 'ranet_counts.json').read_text())
  want = table['ranet_imagenet_train_imagenet_sh']
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.flops',
       '--config=configs/imagenet.py', '--config.model.name=ranet'],
      cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True,
      check=True)
  lines = out.stdout.strip().splitlines()
  assert lines[0].startswith('model.name=ranet: the imagenet ranet preset')
  result = json.loads(lines[-1])
  assert result['mflops'] == pytest.approx(want['mflops'], rel=1e-3)
  assert result['mparams'] == pytest.approx(want['mparams'], rel=1e-3)
