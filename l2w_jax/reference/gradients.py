"""Fixtures of kinds `ge_gradients` and `boostnet_gradients`: the losses and
parameter gradients of one train-mode forward of the gradient-equilibrium
MSDNet (IMTA stage 1), and of BoostNet on it, plus BoostNet's eval-mode
ensemble logits after that forward."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from l2w_jax.convert.torch_state import (flax_to_torch, torch_to_flax,
                                         variables_template)
from l2w_jax.meta import weighting
from l2w_jax.methods import boostnet
from l2w_jax.models.msdnet import MSDNet
from l2w_jax.reference.fixtures import (Check, Fixture, FixtureError,
                                        max_abs_error, msdnet_config,
                                        nchw_to_nhwc, relative_error,
                                        relative_norm_error)

TOLERANCES = {
    'loss': 1e-9,  # relative, per exit / stage
    'grad': 1e-6,  # ||delta|| / ||expected|| over all gradients together
    'logits': 1e-9,  # max abs, times max(1, max |expected|)
}


def _inputs(fixture: Fixture, model: MSDNet):
  """(variables, images, labels) of the fixture in its compute dtype."""
  fixture.require(['x', 'y'])
  model_state = fixture.group('model')
  if not model_state:
    fixture.require(['model/<parameter name>'])
  dtype = fixture.compute_dtype
  if dtype == np.float64 and not jax.config.jax_enable_x64:
    raise FixtureError(f'{fixture.name} needs float64: enable '
                       'jax_enable_x64 before running it')
  images = jnp.asarray(nchw_to_nhwc(fixture.arrays['x']).astype(dtype))
  labels = jnp.asarray(fixture.arrays['y'].astype(np.int32))
  variables = torch_to_flax(model_state, variables_template(model, images),
                            dtype=dtype)
  return variables, images, labels


def _gradients(model: MSDNet, variables, images, labels, losses_of_logits):
  """Per-exit losses (K,), torch-named gradients of their sum, and the
  variables after the train-mode forward."""

  def total(params):
    logits, mutated = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, images,
        train=True, mutable=['batch_stats'])
    losses = losses_of_logits(logits, labels)
    # The original accumulates `loss_all = loss_all + loss` in exit order.
    summed = losses[0]
    for k in range(1, losses.shape[0]):
      summed = summed + losses[k]
    return summed, (losses, mutated['batch_stats'])

  (_, (losses, batch_stats)), grads = jax.jit(
      jax.value_and_grad(total, has_aux=True))(variables['params'])
  named = flax_to_torch({'params': grads})
  after = {'params': variables['params'], 'batch_stats': batch_stats}
  return np.asarray(losses, np.float64), named, after


def _loss_and_grad_checks(fixture, computed, loss_key):
  checks = []
  want = fixture.arrays.get(f'expected/{loss_key}')
  if want is not None:
    checks.append(Check(loss_key, relative_error(
        computed[f'expected/{loss_key}'], want), TOLERANCES['loss']))
  expected = {k: v for k, v in fixture.arrays.items()
              if k.startswith('expected/grad/')}
  if expected:
    checks.append(Check('grad', relative_norm_error(computed, expected),
                        TOLERANCES['grad'], 'relative norm, all together'))
  return checks


def _exit_losses(logits, labels):
  return jnp.mean(weighting.per_exit_losses(logits, labels), axis=0)


def run_ge_gradients_fixture(fixture: Fixture):
  """Gradient equilibrium, loss = sum of the exits' mean cross-entropies."""
  model = MSDNet(dataclasses.replace(msdnet_config(fixture.config),
                                     gradient_equilibrium=True))
  variables, images, labels = _inputs(fixture, model)
  losses, grads, _ = _gradients(model, variables, images, labels,
                                _exit_losses)
  computed = {'expected/exit_losses': losses}
  computed.update({f'expected/grad/{k}': np.asarray(v, np.float64)
                   for k, v in grads.items()})
  return computed, _loss_and_grad_checks(fixture, computed, 'exit_losses')


def run_boostnet_gradients_fixture(fixture: Fixture):
  """BoostNet's stage losses, their gradients, and the eval-mode ensemble
  logits Q_k with the running statistics the training forward left."""
  fixture.require_config(['ensemble_reweight'])
  cfg = msdnet_config(fixture.config)
  reweight = boostnet.reweights(fixture.config['ensemble_reweight'],
                                cfg.n_blocks)
  model = MSDNet(dataclasses.replace(cfg, gradient_equilibrium=True,
                                     ensemble_reweight=reweight))

  def stage_losses(logits, labels):
    return boostnet.stage_losses(logits, labels, reweight)

  variables, images, labels = _inputs(fixture, model)
  losses, grads, after = _gradients(model, variables, images, labels,
                                    stage_losses)
  ensemble = model.apply(after, images, train=False)
  computed = {'expected/stage_losses': losses}
  computed.update({f'expected/grad/{k}': np.asarray(v, np.float64)
                   for k, v in grads.items()})
  for k, q in enumerate(ensemble):
    computed[f'expected/eval_ensemble_logits/{k}'] = np.asarray(q)
  checks = _loss_and_grad_checks(fixture, computed, 'stage_losses')
  expected = {k: v for k, v in fixture.arrays.items()
              if k.startswith('expected/eval_ensemble_logits/')}
  if expected:
    scale = max(1.0, max(float(np.max(np.abs(v))) for v in expected.values()))
    err, where = max_abs_error(computed, expected)
    checks.append(Check('eval_ensemble_logits', err,
                        TOLERANCES['logits'] * scale, where))
  return computed, checks
