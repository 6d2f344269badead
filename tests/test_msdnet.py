"""MSDNet topology, configuration errors, initialisation and conversion."""

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2w_jax.convert.torch_state import (ConversionError, flax_to_torch,
                                         torch_to_flax, variables_template)
from l2w_jax.models.msdnet import MSDNet, MSDNetConfig, msdnet_topology
from tests.tiny import TINY_IMAGE, TINY_MSDNET


def test_forward_returns_one_logit_array_per_exit():
  model = MSDNet(TINY_MSDNET)
  x = jnp.ones((2,) + TINY_IMAGE)
  variables = model.init(jax.random.PRNGKey(0), x)
  logits = model.apply(variables, x, train=False)
  assert len(logits) == 3
  assert all(z.shape == (2, 5) for z in logits)
  logits, mutated = model.apply(variables, x, train=True,
                                mutable=['batch_stats'])
  assert set(mutated) == {'batch_stats'}
  chex.assert_trees_all_equal_shapes_and_dtypes(mutated['batch_stats'],
                                                variables['batch_stats'])
  moved = jax.tree_util.tree_leaves(mutated['batch_stats'])
  before = jax.tree_util.tree_leaves(variables['batch_stats'])
  assert all(not np.allclose(a, b) for a, b in zip(moved, before, strict=True))


@pytest.mark.parametrize('kwargs,field', [
    ({'gr_factor': (1, 2, 4), 'bn_factor': (1, 2)}, 'bn_factor'),
    ({'step_mode': 'linear'}, 'step_mode'),
    ({'prune': 'median'}, 'prune'),
    ({'stem': 'mnist'}, 'stem'),
    ({'n_blocks': 0}, 'n_blocks'),
    ({'reduction': 1.5}, 'reduction'),
    ({'gr_factor': 'one-two'}, 'gr_factor'),
    ({'init': 'xavier'}, 'init'),
    ({'ensemble_reweight': (0.5, 0.5)}, 'ensemble_reweight'),  # 5 exits
])
def test_impossible_configurations_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=f'model.{field}'):
    MSDNetConfig(**kwargs)


def test_widths_that_do_not_add_up_fail_loudly():
  # growth 3 at grFactor 1: ConvDownNormal makes 3 // 2 * 2 = 2 channels
  # where the next layer expects 3, as the original would fail.
  cfg = MSDNetConfig(n_blocks=2, n_channels=4, growth_rate=3,
                     gr_factor=(1, 1), bn_factor=(1, 2), step_mode='even',
                     step=1, base=1, num_classes=5)
  model = MSDNet(cfg)
  with pytest.raises(ValueError, match='expects .* input channels'):
    model.init(jax.random.PRNGKey(0), jnp.ones((1,) + TINY_IMAGE))


def test_images_that_do_not_fit_the_scales_are_refused():
  cfg = MSDNetConfig(stem='imagenet', num_classes=10)  # 3 scales at 224 px
  with pytest.raises(ValueError, match='needs 1x1'):
    variables_template(MSDNet(cfg), jnp.ones((1, 224, 224, 3)))


def test_factor_strings_like_the_original_command_line():
  cfg = MSDNetConfig(gr_factor='1-2-4-4', bn_factor='1-2-4-4')
  assert cfg.gr_factor == (1, 2, 4, 4) and cfg.n_scales == 4


def test_topology_of_the_paper_cifar_network():
  blocks, classifier_in = msdnet_topology(MSDNetConfig())
  # lin_grow, step 1, base 1: 1, 2, 3, 4, 5 layers; two transitions where the
  # scales drop (prune max), the first block also holds the stem.
  assert [sum(l.kind == 'msdn' for l in b) for b in blocks] == [1, 2, 3, 4, 5]
  assert sum(l.kind == 'transition' for b in blocks for l in b) == 2
  assert blocks[0][0].kind == 'first'
  assert len(classifier_in) == 5


def test_imagenet_stem_and_prune_min_build_and_run():
  for cfg, size in ((MSDNetConfig(n_blocks=2, n_channels=4, growth_rate=2,
                                  gr_factor=(1, 2, 4), bn_factor=(1, 2, 4),
                                  step_mode='even', step=1, base=1,
                                  stem='imagenet', num_classes=7), 112),
                    (MSDNetConfig(n_blocks=3, n_channels=4, growth_rate=2,
                                  gr_factor=(1, 2), bn_factor=(1, 1),
                                  step_mode='lin_grow', prune='min',
                                  num_classes=7), 16)):
    model = MSDNet(cfg)
    x = jnp.ones((2, size, size, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    assert [z.shape for z in model.apply(variables, x)] == [(2, 7)] * len(
        msdnet_topology(cfg)[0])
  stem = variables_template(
      MSDNet(MSDNetConfig(stem='imagenet', gr_factor=(1, 2, 4, 4),
                          bn_factor=(1, 2, 4, 4))), jnp.ones((1, 224, 224, 3)))
  assert stem['params']['blocks_0_0']['layers_0_0']['bias'].shape == (16,)


def test_default_init_is_pytorch_default_and_msdnet_init_is_available():
  x = jnp.ones((1,) + TINY_IMAGE)
  torch_like = MSDNet(TINY_MSDNET).init(jax.random.PRNGKey(0), x)['params']
  kernel = torch_like['blocks_0_1']['layers_0']['conv_normal']['net_0'][
      'kernel']
  bound = 1 / np.sqrt(np.prod(kernel.shape[:3]))
  assert float(jnp.max(jnp.abs(kernel))) <= bound
  assert float(jnp.max(jnp.abs(torch_like['classifier_0']['linear']['bias']))
              ) > 0
  cfg = MSDNetConfig(**{**TINY_MSDNET.__dict__, 'init': 'msdnet'})
  intended = MSDNet(cfg).init(jax.random.PRNGKey(0), x)['params']
  assert float(jnp.max(jnp.abs(intended['classifier_0']['linear']['bias']))
              ) == 0.0


def test_conversion_round_trip_and_names():
  model = MSDNet(TINY_MSDNET)
  x = jnp.ones((1,) + TINY_IMAGE)
  variables = model.init(jax.random.PRNGKey(3), x)
  state_dict = flax_to_torch(variables, num_batches_tracked=7)
  conv = state_dict['blocks.0.1.layers.1.conv_down.net.3.weight']
  kernel = variables['params']['blocks_0_1']['layers_1']['conv_down'][
      'net_3']['kernel']
  np.testing.assert_array_equal(conv, np.transpose(kernel, (3, 2, 0, 1)))
  assert state_dict['blocks.0.0.layers.0.net.1.num_batches_tracked'] == 7
  assert state_dict['classifier.2.linear.weight'].shape == (5, 128)
  back = torch_to_flax(state_dict, variables_template(model, x))
  chex.assert_trees_all_equal(back, flax.core.unfreeze(variables))


def test_conversion_reports_missing_unexpected_and_misshapen_entries():
  model = MSDNet(TINY_MSDNET)
  x = jnp.ones((1,) + TINY_IMAGE)
  template = variables_template(model, x)
  state_dict = flax_to_torch(model.init(jax.random.PRNGKey(0), x))
  del state_dict['classifier.0.linear.bias']
  state_dict['classifier.9.linear.bias'] = np.zeros(5, np.float32)
  state_dict['classifier.1.linear.weight'] = np.zeros((6, 128), np.float32)
  with pytest.raises(ConversionError) as error:
    torch_to_flax(state_dict, template)
  message = str(error.value)
  assert 'missing: classifier.0.linear [params/bias]' in message
  assert 'unexpected: classifier.9.linear [params/bias]' in message
  assert 'shape of classifier.1.linear [params/kernel]' in message
