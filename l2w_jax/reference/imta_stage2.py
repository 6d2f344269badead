"""Fixtures of kind `imta_stage2`: one IMTA stage-2 forward and backward
(frozen gradient-equilibrium MSDNet in train mode, new heads with ISC, one-
for-all distillation), the BN buffers it moves, and eval-mode logits after."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from l2w_jax.convert.torch_state import (flax_to_torch, torch_to_flax,
                                         variables_template)
from l2w_jax.methods.imta import IMTAHeads, distillation_loss
from l2w_jax.models.msdnet import MSDNet
from l2w_jax.reference.fixtures import (Check, Fixture, FixtureError,
                                        max_abs_error, msdnet_config,
                                        nchw_to_nhwc, relative_error,
                                        relative_norm_error)

TOLERANCES = {
    'loss': 1e-9,  # relative
    'grad': 1e-6,  # ||delta|| / ||expected||, heads and ISC together
    'logits': 1e-9,  # max abs, times max(1, max |expected|)
    'bn': 1e-6,  # max abs, buffers after the training forward
}
_BACKBONE = 'net.'


def _split_state(fixture: Fixture):
  """(backbone state_dict without 'net.', heads state_dict)."""
  state = fixture.group('model')
  backbone = {k[len(_BACKBONE):]: v for k, v in state.items()
              if k.startswith(_BACKBONE)}
  heads = {k: v for k, v in state.items()
           if k.startswith(('classifier.', 'isc_modules.'))}
  if not backbone or not heads:
    fixture.require(['model/net.<backbone name>', 'model/classifier.<k>...',
                     'model/isc_modules.<k>...'])
  return backbone, heads


def run_imta_stage2_fixture(fixture: Fixture):
  """Returns (computed entries under the fixture's key names, checks)."""
  c = fixture.config
  fixture.require_config(['T', 'gamma'])
  fixture.require(['x', 'y'])
  dtype = fixture.compute_dtype
  if dtype == np.float64 and not jax.config.jax_enable_x64:
    raise FixtureError(f'{fixture.name} needs float64: enable '
                       'jax_enable_x64 before running it')
  backbone = MSDNet(dataclasses.replace(msdnet_config(c),
                                        gradient_equilibrium=True))
  images = jnp.asarray(nchw_to_nhwc(fixture.arrays['x']).astype(dtype))
  labels = jnp.asarray(fixture.arrays['y'].astype(np.int32))
  backbone_state, head_state = _split_state(fixture)
  backbone_vars = torch_to_flax(
      backbone_state, variables_template(backbone, images[:1]), dtype=dtype)

  # The widths the heads read: each old classifier's pooled feature.
  pooled, _ = backbone.apply(backbone_vars, images[:1], False,
                             method=MSDNet.exit_features)
  heads = IMTAHeads(tuple(int(p.shape[-1]) for p in pooled),
                    backbone.cfg.num_classes)
  head_vars = torch_to_flax(head_state, jax.eval_shape(
      functools.partial(heads.init, train=False), jax.random.PRNGKey(0),
      pooled), dtype=dtype)

  # Train mode everywhere; the backbone is frozen (no gradient), but its
  # running statistics move.
  (pooled, old_logits), moved = backbone.apply(
      backbone_vars, images, True, method=MSDNet.exit_features,
      mutable=['batch_stats'])
  pooled = [jax.lax.stop_gradient(p) for p in pooled]

  def loss_fn(params):
    logits, head_moved = heads.apply(
        {'params': params, 'batch_stats': head_vars['batch_stats']}, pooled,
        True, mutable=['batch_stats'])
    loss = distillation_loss(logits, old_logits[-1], labels,
                             float(c['T']), float(c['gamma']))
    return loss, (logits, head_moved['batch_stats'])

  (loss, (train_logits, head_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(head_vars['params'])
  backbone_after = {'params': backbone_vars['params'],
                    'batch_stats': moved['batch_stats']}
  heads_after = {'params': head_vars['params'], 'batch_stats': head_stats}
  eval_pooled, _ = backbone.apply(backbone_after, images, False,
                                  method=MSDNet.exit_features)
  eval_logits = heads.apply(heads_after, eval_pooled, False)

  computed = {'expected/loss': np.array([float(loss)])}
  for name, value in flax_to_torch({'params': grads}).items():
    computed[f'expected/grad/{name}'] = np.asarray(value, np.float64)
  for k, (z_train, z_eval) in enumerate(zip(train_logits, eval_logits)):
    computed[f'expected/train_logits/{k}'] = np.asarray(z_train)
    computed[f'expected/eval_logits/{k}'] = np.asarray(z_eval)
  for prefix, variables in ((_BACKBONE, backbone_after), ('', heads_after)):
    for name, value in flax_to_torch(variables).items():
      if name.endswith(('running_mean', 'running_var')):
        computed[f'expected/after_train_forward/model/{prefix}{name}'] = (
            np.asarray(value, np.float32))
  return computed, _checks(fixture, computed)


def _checks(fixture: Fixture, computed):
  arrays = fixture.arrays
  checks = []
  if 'expected/loss' in arrays:
    checks.append(Check('loss', relative_error(computed['expected/loss'],
                                               arrays['expected/loss']),
                        TOLERANCES['loss']))
  grads = {k: v for k, v in arrays.items() if k.startswith('expected/grad/')}
  if grads:
    checks.append(Check('grad', relative_norm_error(computed, grads),
                        TOLERANCES['grad'], 'relative norm, all together'))
  for mode in ('train_logits', 'eval_logits'):
    expected = {k: v for k, v in arrays.items()
                if k.startswith(f'expected/{mode}/')}
    if expected:
      scale = max(1.0, max(float(np.max(np.abs(v)))
                           for v in expected.values()))
      err, where = max_abs_error(computed, expected)
      checks.append(Check(mode, err, TOLERANCES['logits'] * scale, where))
  expected = {k: v for k, v in arrays.items()
              if k.startswith('expected/after_train_forward/')}
  if expected:
    err, where = max_abs_error(computed, expected)
    checks.append(Check('bn_after_train_forward', err, TOLERANCES['bn'],
                        where))
  return checks
