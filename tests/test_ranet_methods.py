"""Every training method and the real cascade on a RANet (TINY_RANET: two
scale flows, 3 exits), the whole-batch methods sharded over 8 simulated
devices."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2w_jax.meta import weighting
from l2w_jax.models.ranet import RANet, RANetConfig
from l2w_jax.optim import sgd_momentum
from l2w_jax.training import registry
from tests.tiny import (TINY_IMAGE, TINY_RANET,
                        check_cascade_against_simulated, float64_step_setup,
                        mean_tree, sharded_and_per_device, tiny_ranet_config)

LR = 0.3  # the learning rate of `sharded_and_per_device`


def _phase_step(learner, method: str, phase: str):
  """The jitted whole-batch step of `method`'s `phase` on one device."""
  step = next(s for s in registry.get(method).steps if s.name == phase)
  return jax.jit(lambda state, x, y: step.batch_step(learner, state, x, y,
                                                     LR))


def _changed(new, old) -> set[str]:
  """Top-level parameter groups (and IMTA's `net` / `heads`) that moved."""
  def groups(params):
    if set(params) == {'net', 'heads'}:
      return {f'{part}/{name}': value for part in params
              for name, value in params[part].items()}
    return dict(params)
  new, old = groups(new), groups(old)
  return {name for name in old if any(
      not np.array_equal(a, b) for a, b in zip(
          jax.tree_util.tree_leaves(new[name]),
          jax.tree_util.tree_leaves(old[name]), strict=True))}


# (method, phase, the parameter groups the phase trains).
_BACKBONE = {'FirstLayer', 'scale_flows_0_0', 'scale_flows_0_1',
             'scale_flows_1_0', 'scale_flows_1_1', 'scale_flows_1_2'}
_CASES = [
    ('boostnet', 'boostnet', _BACKBONE | {'classifier_0', 'classifier_1',
                                          'classifier_2'}),
    ('regime_disjoint', 'backbone', _BACKBONE | {'classifier_2'}),
    ('regime_disjoint', 'heads', {'classifier_0', 'classifier_1'}),
    ('imta', 'stage1', {f'net/{n}' for n in _BACKBONE} | {
        'net/classifier_0', 'net/classifier_1', 'net/classifier_2'}),
    ('imta', 'stage2', {'heads/classifier_0', 'heads/classifier_1',
                        'heads/classifier_2'} | {
                            f'heads/isc_modules_{k}_{i}' for k in (0, 1)
                            for i in (0, 1)}),  # Linear, BatchNorm
]


@pytest.mark.parametrize('method,phase,trained', _CASES,
                         ids=[f'{m}-{p}' for m, p, _ in _CASES])
def test_sharded_step_on_ranet_equals_each_device_then_averaged(
    float64, method, phase, trained):
  """8 devices, each its own shard and BatchNorm statistics: the update is
  the mean of the per-device updates (SGD is linear in the gradient), the
  running statistics device 0's, and exactly the phase's groups move."""
  del float64
  config = tiny_ranet_config()
  config.method = method
  learner, state, _, _ = float64_step_setup(config)
  assert isinstance(learner.model.cfg, RANetConfig)
  sharded, metrics, alone = sharded_and_per_device(
      method, learner, state, _phase_step(learner, method, phase),
      phase=None if len(registry.get(method).steps) == 1 else phase)
  chex.assert_trees_all_close(
      (sharded.params, sgd_momentum(sharded.opt_state)),
      mean_tree([(s.params, sgd_momentum(s.opt_state)) for s in alone]),
      rtol=1e-9, atol=1e-12)
  chex.assert_trees_all_close(sharded.batch_stats, alone[0].batch_stats,
                              rtol=1e-12, atol=1e-14)
  assert _changed(sharded.params, state.params) == trained
  assert int(metrics['num_images']) == 32
  assert metrics['loss_per_exit'].shape == (3,)


def _exit_loss_grads(model, variables, images, labels, weights):
  """Gradient of sum_k weights_k CE_k (batch means) in train mode."""
  def total(params):
    logits, _ = model.apply({'params': params,
                             'batch_stats': variables['batch_stats']},
                            images, train=True, mutable=['batch_stats'])
    return jnp.sum(jnp.asarray(weights) * jnp.mean(
        weighting.per_exit_losses(logits, labels), axis=0))
  return jax.jit(jax.grad(total))(variables['params'])


def test_gradient_equilibrium_on_ranet_rescales_what_each_exit_reads():
  """Same forward. With g_k the plain gradient of exit k's loss alone:
  flow 1's blocks and classifier 2 feed only exit 2 (scale 1): g_2; block
  0_1 feeds exit 1 through the feature classifier 1 reads (scale 1/2) and
  exit 2 through flow 1's fusion (not rescaled): g_1 / 2 + g_2; every
  classifier's own parameters get their plain gradient; block 0_0, rescaled
  on its way on, differs from the plain sum."""
  plain = RANet(TINY_RANET)
  with_ge = RANet(dataclasses.replace(TINY_RANET, gradient_equilibrium=True))
  images = jax.random.normal(jax.random.PRNGKey(0), (6,) + TINY_IMAGE)
  labels = jnp.arange(6) % 5
  variables = plain.init(jax.random.PRNGKey(1), images, train=False)
  for a, b in zip(plain.apply(variables, images),
                  with_ge.apply(variables, images), strict=True):
    np.testing.assert_array_equal(a, b)
  g = [_exit_loss_grads(plain, variables, images, labels, np.eye(3)[k])
       for k in range(3)]
  g_ge = _exit_loss_grads(with_ge, variables, images, labels, np.ones(3))
  def close(got, want):
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
  for name in ('scale_flows_1_0', 'scale_flows_1_1', 'scale_flows_1_2'):
    close(g_ge[name], g[2][name])
  for k in range(3):
    close(g_ge[f'classifier_{k}'], g[k][f'classifier_{k}'])
  close(g_ge['scale_flows_0_1'], jax.tree_util.tree_map(
      lambda a, b: a / 2 + b, g[1]['scale_flows_0_1'],
      g[2]['scale_flows_0_1']))
  plain_sum = jax.tree_util.tree_map(lambda *x: sum(x), *[
      gk['scale_flows_0_0'] for gk in g])
  differs = jax.tree_util.tree_map(
      lambda a, b: float(jnp.max(jnp.abs(a - b))), g_ge['scale_flows_0_0'],
      plain_sum)
  assert max(jax.tree_util.tree_leaves(differs)) > 1e-4


def test_gradient_equilibrium_on_a_single_flow_ranet_is_msdnet_s_rule():
  """One scale flow of 3 blocks on 8 px images (each block feeds the next
  and its exit, like MSDNet's coarsest scale): block i gets
  (g_i + ... + g_{K-1}) / (K - i), IMTA's rule."""
  cfg = dataclasses.replace(TINY_RANET, scale_list=(1,), gr_factor=(1,),
                            bn_factor=(1,), n_blocks=3)
  plain = RANet(cfg)
  with_ge = RANet(dataclasses.replace(cfg, gradient_equilibrium=True))
  images = jax.random.normal(jax.random.PRNGKey(0), (6, 8, 8, 3))
  labels = jnp.arange(6) % 5
  variables = plain.init(jax.random.PRNGKey(1), images, train=False)
  g = [_exit_loss_grads(plain, variables, images, labels, np.eye(3)[k])
       for k in range(3)]
  g_ge = _exit_loss_grads(with_ge, variables, images, labels, np.ones(3))
  for i in range(3):
    name = f'scale_flows_0_{i}'
    want = jax.tree_util.tree_map(lambda *x: sum(x) / (3 - i),
                                  *[gk[name] for gk in g[i:]])
    chex.assert_trees_all_close(g_ge[name], want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('reweight', [(), (0.5, 0.25, 0.75)],
                         ids=['plain', 'boosted'])
def test_cascade_on_ranet_gives_the_simulated_predictions(reweight):
  """Real early exiting of a RANet (stage 2 starts the second flow from its
  stem features and fuses the first flow's outputs of the exited-or-not
  samples kept) equals simulated exiting, in batches and one by one."""
  model = RANet(dataclasses.replace(TINY_RANET, ensemble_reweight=reweight))
  exits = check_cascade_against_simulated(model)
  assert set(exits.tolist()) == {0, 1, 2}
