"""Fixtures of kind `l2w_iteration`: one whole L2W training iteration (two
halves, each with a meta step and a real step) from a given state."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from l2w_jax.convert.torch_state import (flax_to_torch, torch_to_flax,
                                         variables_template)
from l2w_jax.meta import weighting
from l2w_jax.methods import l2w
from l2w_jax.models.msdnet import MSDNet
from l2w_jax.models.weight_net import WeightNet, weight_net_input_size
from l2w_jax.reference.fixtures import (Check, Fixture, FixtureError,
                                        NotCompared, max_abs_error,
                                        mismatch_count,
                                        msdnet_config, nchw_to_nhwc,
                                        relative_error, relative_norm_error)
from l2w_jax.optim import torch_adam, torch_sgd, with_sgd_momentum
from l2w_jax.training.state import Settings, TrainState

TOLERANCES = {
    'weights': 1e-9,  # pseudo weights and real-step weights, max abs
    'meta_grad': 1e-6,  # relative norm
    'loss': 1e-9,  # meta loss and train loss, relative
    'model_after': 1e-6,  # max abs, float32 storage
    'meta_net_after': 1e-8,  # max abs
}
_REQUIRED_CONFIG = ('lr', 'meta_lr', 'epsilon', 'constraint_dimension',
                    'meta_net_input_type', 'meta_net_hidden_size',
                    'meta_net_num_layers')


def _weight_net_output(config) -> str:
  """tanh (`MLP_tanh`, the original's choice) unless the fixture says sigmoid."""
  for key in ('meta_net_output', 'meta_net_activation'):
    if key in config:
      return str(config[key]).lower()
  arch = str(config.get('meta_net_arch', config.get('meta_net', 'MLP_tanh')))
  return 'tanh' if arch.lower().endswith('tanh') else 'sigmoid'


def _unsupported(config) -> None:
  if config.get('nesterov', False) or config.get('dampening', 0):
    raise FixtureError('l2w_iteration: Nesterov momentum and dampening are '
                       'not used by the original and not supported')


def run_l2w_iteration_fixture(fixture: Fixture):
  """Returns (computed entries under the fixture's key names, checks)."""
  c = fixture.config
  fixture.require_config(_REQUIRED_CONFIG)
  fixture.require(['x', 'y'])
  _unsupported(c)
  model_state = fixture.group('model')
  meta_state = fixture.group('meta_net')
  momentum = fixture.group('momentum')
  if not model_state or not meta_state:
    fixture.require(['model/<parameter name>', 'meta_net/<parameter name>'])
  dtype = fixture.compute_dtype
  if dtype == np.float64 and not jax.config.jax_enable_x64:
    raise FixtureError(f'{fixture.name} needs float64: enable '
                       'jax_enable_x64 before running it')

  model = MSDNet(msdnet_config(c))
  num_exits = model.cfg.n_blocks
  weight_net = WeightNet(
      num_inputs=weight_net_input_size(c['meta_net_input_type'], num_exits),
      num_exits=num_exits, hidden_size=int(c['meta_net_hidden_size']),
      num_layers=int(c['meta_net_num_layers']), output=_weight_net_output(c))
  images = jnp.asarray(nchw_to_nhwc(fixture.arrays['x']).astype(dtype))
  labels = jnp.asarray(fixture.arrays['y'].astype(np.int32))
  variables = torch_to_flax(model_state, variables_template(model, images),
                            dtype=dtype)
  meta_template = variables_template(
      weight_net, jnp.zeros((1, weight_net.num_inputs), dtype))
  meta_params = torch_to_flax(meta_state, meta_template, dtype=dtype)['params']

  if 'target_probs' in fixture.arrays:
    probs = fixture.arrays['target_probs']
  else:
    fixture.require_config(['target_p_index'])
    probs = weighting.target_probs(num_exits, int(c['target_p_index']))
  tx = torch_sgd(c['lr'], c.get('momentum', 0.9), c.get('weight_decay', 1e-4))
  meta_tx = torch_adam(c['meta_lr'], c.get('meta_weight_decay', 0.0))
  opt_state = tx.init(variables['params'])
  if momentum:
    buffers = torch_to_flax(momentum, {'params': variables['params']},
                            dtype=dtype)['params']
    opt_state = with_sgd_momentum(opt_state, buffers)
  state = TrainState(
      step=jnp.zeros((), jnp.int32), params=variables['params'],
      batch_stats=variables['batch_stats'], opt_state=opt_state,
      meta_params=meta_params, meta_opt_state=meta_tx.init(meta_params))
  learner = l2w.l2w_learner(
      model, weight_net, tx, meta_tx, l2w.L2WSettings(
          epsilon=float(c['epsilon']), constraint=c['constraint_dimension'],
          input_kind=c['meta_net_input_type'],
          target_probs=tuple(float(q) for q in np.float32(probs))),
      Settings(label_smoothing=float(c.get('label_smoothing', 0.0))))
  half_step = jax.jit(functools.partial(l2w.l2w_half_step, learner),
                      static_argnames='with_meta')
  lr = jnp.asarray(c['lr'], dtype)
  meta_lr = jnp.asarray(c['meta_lr'], dtype)
  state, halves = l2w.l2w_iteration(half_step, state, images, labels, lr,
                                    meta_lr, with_meta=True)
  computed = _computed_entries(state, halves, model_state)
  return computed, _checks(fixture, computed)


def _computed_entries(state, halves, model_state):
  """Everything the iteration produced, under the fixture's key names."""
  computed = {}
  for h, metrics in enumerate(halves, start=1):
    prefix = f'expected/half{h}'
    computed[f'{prefix}/pseudo_weights'] = np.asarray(
        metrics['pseudo_weights'], np.float64)
    computed[f'{prefix}/exit_assignment'] = np.asarray(
        metrics['exit_assignment'], np.int64)
    grads = flax_to_torch({'params': metrics['meta_grads']})
    for name, value in grads.items():
      computed[f'{prefix}/meta_grad/{name}'] = np.asarray(value, np.float64)
    computed[f'{prefix}/weights'] = np.asarray(metrics['weights'], np.float64)
  computed['expected/meta_loss'] = np.array(
      [float(m['meta_loss']) for m in halves])
  computed['expected/train_loss'] = np.array(
      [float(m['train_loss']) for m in halves])
  tracked = [v for k, v in model_state.items()
             if k.endswith('num_batches_tracked')]
  before = int(tracked[0]) if tracked else 0
  after = flax_to_torch({'params': state.params,
                         'batch_stats': state.batch_stats},
                        num_batches_tracked=before + len(halves))
  for name, value in after.items():
    if value.dtype.kind == 'f':
      value = value.astype(np.float32)
    computed[f'expected/after/model/{name}'] = value
  for name, value in flax_to_torch({'params': state.meta_params}).items():
    computed[f'expected/after/meta_net/{name}'] = np.asarray(value,
                                                             np.float64)
  return computed


def _checks(fixture: Fixture, computed):
  """Comparisons with whatever expected entries the fixture holds (`Check`s,
  plus a `NotCompared` for entries that cannot be checked meaningfully)."""
  arrays = fixture.arrays
  checks = []

  def expected_under(prefix):
    return {k: v for k, v in arrays.items() if k.startswith(prefix)}

  for h in (1, 2):
    prefix = f'expected/half{h}'
    for name in ('pseudo_weights', 'weights'):
      key = f'{prefix}/{name}'
      if key in arrays:
        err, _ = max_abs_error(computed, {key: arrays[key]})
        checks.append(Check(f'half{h}/{name}', err, TOLERANCES['weights']))
    key = f'{prefix}/exit_assignment'
    if key in arrays:
      checks.append(Check(f'half{h}/exit_assignment',
                          mismatch_count(computed[key], arrays[key]), 0.0,
                          'entries that differ'))
    expected = expected_under(f'{prefix}/meta_grad/')
    if expected:
      checks.append(Check(f'half{h}/meta_grad',
                          relative_norm_error(computed, expected),
                          TOLERANCES['meta_grad'], 'relative norm'))
  for name in ('meta_loss', 'train_loss'):
    key = f'expected/{name}'
    if key in arrays:
      checks.append(Check(name, relative_error(computed[key], arrays[key]),
                          TOLERANCES['loss'], 'relative'))
  expected = expected_under('expected/after/model/')
  if expected:
    counters = {k: v for k, v in expected.items()
                if k.endswith('num_batches_tracked')}
    floats = {k: v for k, v in expected.items() if k not in counters}
    err, where = max_abs_error(computed, floats)
    checks.append(Check('after/model', err, TOLERANCES['model_after'], where))
    if counters:
      # Rebuilt from the fixture's own count plus the two halves, so a
      # comparison could not fail: reported, not counted as a check.
      checks.append(NotCompared(
          'after/model/num_batches_tracked',
          'derived from the input count (+1 per half), not computed'))
  expected = expected_under('expected/after/meta_net/')
  if expected:
    err, where = max_abs_error(computed, expected)
    checks.append(Check('after/meta_net', err, TOLERANCES['meta_net_after'],
                        where))
  return checks
