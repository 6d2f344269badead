"""Fixtures of kind `l2w_training`: consecutive iterations of the original's
`train()` (epochs, the meta interval, both learning-rate schedules, the
optimizers' states carried over), run through the training loop's own code.

The run is the one `experiments.main` makes, minus the input pipeline: the
config is built like an experiment's (`configs.common`), the learner by
`build_learner`, the initial state by `train_state_from` (fresh optimizer
states, as the original's), every iteration's phase, learning rates and meta
step by `schedules.iteration_schedule`, and the iteration by
`step.make_iteration` on a one-device mesh. Only what the fixture must be
compared with is read out after each iteration.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from l2w_jax import parallel
from l2w_jax.convert.torch_state import (flax_to_torch, torch_to_flax,
                                         variables_template)
from l2w_jax.meta import weighting
from l2w_jax.optim import adam_moments, sgd_momentum
from l2w_jax.reference.fixtures import (Check, Fixture, FixtureError,
                                        NotCompared, max_abs_error,
                                        mismatch_count, msdnet_config,
                                        nchw_to_nhwc, relative_error,
                                        relative_norm_error)
from l2w_jax.training import registry, schedules
from l2w_jax.training import step as step_lib
from l2w_jax.training.config_checks import reduction_of, validate_config
from l2w_jax.training.learner import build_learner, train_state_from

# The README's tolerances (`config_json["tolerances"]` gives their metrics).
TOLERANCES = {
    'model_params': 5e-10, 'model_stats': 5e-9, 'bn_running_stats': 5e-10,
    'momentum': 5e-9, 'momentum_stats': 2e-8, 'meta_net': 1e-11,
    'adam_exp_avg': 2e-9, 'adam_exp_avg_sq': 5e-9, 'weights': 5e-10,
    'meta_net_input': 1e-9, 'losses': 2e-10, 'meta_grad': 1e-8,
    'lr': 1e-14,
}
_REQUIRED_CONFIG = ('lr', 'momentum', 'weight_decay', 'meta_lr',
                    'meta_weight_decay', 'epsilon', 'constraint_dimension',
                    'meta_net_input_type', 'meta_interval', 'batch_size',
                    'steps_per_epoch', 'epochs', 'target_p_index')
_MODEL_FIELDS = ('n_blocks', 'n_channels', 'growth_rate', 'gr_factor',
                 'bn_factor', 'step_mode', 'step', 'base', 'prune',
                 'bottleneck', 'reduction')


def training_config(c: dict, arrays: dict) -> ml_collections.ConfigDict:
  """The experiment config of the fixture's run of the original's `train()`.

  Args:
    c: the fixture's `config_json` (the original's argument names).
    arrays: the fixture's arrays (`target_probs`, if present, are used).

  Returns:
    An L2W-DEN config as `configs/cifar100.py` builds it, with the
    fixture's network, optimizers, weight net, meta interval, batch size
    and epochs.
  """
  from configs import common  # pylint: disable=g-import-not-at-top
  args = c.get('args', {})
  config = common.base_config()
  model = msdnet_config(c)
  with config.unlocked():
    config.dataset.name = str(c.get('data', 'cifar100'))
    config.dataset.num_classes = model.num_classes
    for field in _MODEL_FIELDS:
      config.model[field] = getattr(model, field)
    config.train.lr = float(c['lr'])
    config.train.momentum = float(c['momentum'])
    config.train.weight_decay = float(c['weight_decay'])
    config.train.batch_size = int(c['batch_size'])
    config.train.epochs = int(c['epochs'])
    config.train.schedule = 'cosine'  # the original's, whatever --lr-type
    config.train.label_smoothing = 0.0
    config.meta.lr = float(c['meta_lr'])
    config.meta.weight_decay = float(c['meta_weight_decay'])
    config.meta.epsilon = float(c['epsilon'])
    config.meta.constraint = str(c['constraint_dimension'])
    config.meta.input = str(c['meta_net_input_type'])
    config.meta.hidden_size = int(args.get('meta_net_hidden_size',
                                           c.get('meta_net_hidden_size', 500)))
    config.meta.num_layers = int(args.get('meta_net_num_layers',
                                          c.get('meta_net_num_layers', 1)))
    config.meta.interval = int(c['meta_interval'])
    config.meta.target_p_index = int(c['target_p_index'])
    if 'target_probs' in arrays:  # the float32 values the original used
      config.meta.target_probs = tuple(float(q) for q in arrays['target_probs'])
    config.distributed.num_devices = 1
  return config


def run_l2w_training_fixture(fixture: Fixture):
  """Returns (computed entries under the fixture's key names, checks)."""
  c = fixture.config
  fixture.require_config(_REQUIRED_CONFIG)
  fixture.require(['batches/x', 'batches/y'])
  model_state, meta_state = fixture.group('model'), fixture.group('meta_net')
  if not model_state or not meta_state:
    fixture.require(['model/<parameter name>', 'meta_net/<parameter name>'])
  if fixture.group('momentum'):
    raise FixtureError(f'{fixture.name}: l2w_training starts from empty '
                       'optimizer states, as the original does; momentum/* '
                       'entries are not supported')
  dtype = fixture.compute_dtype
  if dtype == np.float64 and not jax.config.jax_enable_x64:
    raise FixtureError(f'{fixture.name} needs float64: enable '
                       'jax_enable_x64 before running it')
  config = training_config(c, fixture.arrays)
  validate_config(config)
  learner = build_learner(config)
  xs = fixture.arrays['batches/x']
  ys = fixture.arrays['batches/y']
  num_iterations = xs.shape[0]
  steps_per_epoch = int(c['steps_per_epoch'])
  total = schedules.total_iterations(config.train, steps_per_epoch)
  if num_iterations > total:
    raise FixtureError(f'{fixture.name}: {num_iterations} batches but the '
                       f'run has {total} iterations')

  images = [jnp.asarray(nchw_to_nhwc(x).astype(dtype)) for x in xs]
  variables = torch_to_flax(model_state,
                            variables_template(learner.model, images[0]),
                            dtype=dtype)
  meta_template = variables_template(
      learner.weight_net,
      jnp.zeros((1, learner.weight_net.num_inputs), dtype))
  meta_params = torch_to_flax(meta_state, meta_template, dtype=dtype)['params']
  state = train_state_from(learner, variables, meta_params)

  mesh = parallel.make_mesh(1)
  plan = registry.phase_plan(config, total)
  iteration = step_lib.make_iteration(
      config.method, learner, mesh, config.train.bn_stats,
      reduction=reduction_of(config), per_sample_metrics=True)
  tracked = [int(v) for k, v in model_state.items()
             if k.endswith('num_batches_tracked')]
  snapshots = []
  for t in range(num_iterations):
    scheduled = schedules.iteration_schedule(config, plan, t, steps_per_epoch)
    state, halves = iteration(state, images[t], ys[t].astype(np.int32),
                              scheduled.lr, scheduled.meta_lr,
                              scheduled.with_meta,
                              phase=scheduled.phase.name)
    snapshots.append(_snapshot(jax.device_get((state, halves)), scheduled,
                               steps_per_epoch, t, config,
                               (tracked[0] if tracked else 0) + 2 * (t + 1)))
  computed = _stack(snapshots, fixture.group('sample_index'))
  return computed, _checks(fixture, computed, num_iterations)


def _snapshot(fetched, scheduled, steps_per_epoch, t, config,
              num_batches_tracked) -> dict:
  """What iteration t left and produced, in PyTorch names and layouts."""
  state, halves = fetched
  model = flax_to_torch({'params': state.params,
                         'batch_stats': state.batch_stats},
                        num_batches_tracked=num_batches_tracked)
  momentum = flax_to_torch({'params': sgd_momentum(state.opt_state)})
  count, mu, nu = adam_moments(state.meta_opt_state)
  out = {
      'lr': scheduled.lr, 'meta_lr': scheduled.meta_lr,
      'meta_step': scheduled.with_meta, 'epoch': t // steps_per_epoch,
      'batch_index': t % steps_per_epoch,
      'model': model, 'momentum': momentum,
      'meta_net': flax_to_torch({'params': state.meta_params}),
      'adam/exp_avg': flax_to_torch({'params': mu}),
      'adam/exp_avg_sq': flax_to_torch({'params': nu}),
      'adam_step': int(count),
  }
  kind = config.meta.input
  per_half = []
  for metrics in halves:
    losses = np.asarray(metrics['losses'], np.float64)
    weights = np.asarray(metrics['weights'], np.float64)
    inputs = np.asarray(weighting.weight_net_inputs(
        losses, np.asarray(metrics['confidences'], np.float64), kind))
    half = {'weights': weights, 'meta_net_input': inputs,
            'exit_losses': np.mean(weights * losses, axis=0),
            'train_loss': float(metrics['train_loss'])}
    if scheduled.with_meta:
      # The project's virtual step reuses the real step's forward pass on
      # the training half, so the pseudo step's weight-net input is the
      # real step's (the original computes it twice, equal values).
      half.update(
          pseudo_weights=np.asarray(metrics['pseudo_weights'], np.float64),
          meta_net_input_pseudo=inputs,
          meta_loss=float(metrics['meta_loss']),
          exit_assignment=np.asarray(metrics['exit_assignment'], np.int64),
          meta_grad=flax_to_torch({'params': metrics['meta_grads']}))
    per_half.append(half)
  out['halves'] = per_half
  return out


def _stats(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return np.array([np.sum(x), np.sum(np.abs(x)), np.sum(x * x)])


def _stack(snapshots: list[dict], sample_index: dict) -> dict:
  """Per-iteration snapshots -> the fixture's `expected/...` arrays (leading
  axis: iteration; then half)."""
  out = {}
  e = 'expected'
  for name in ('lr', 'meta_lr', 'meta_step', 'epoch', 'batch_index'):
    out[f'{e}/{name}'] = np.array([s[name] for s in snapshots])
  first = snapshots[0]
  for name in first['model']:
    values = [np.asarray(s['model'][name]) for s in snapshots]
    if name in sample_index:  # a parameter: sampled entries and statistics
      index = np.asarray(sample_index[name])
      out[f'{e}/model_sample/{name}'] = np.stack(
          [v.ravel()[index] for v in values]).astype(np.float64)
      out[f'{e}/model_stats/{name}'] = np.stack([_stats(v) for v in values])
      moms = [np.asarray(s['momentum'][name]) for s in snapshots]
      out[f'{e}/momentum_sample/{name}'] = np.stack(
          [m.ravel()[index] for m in moms]).astype(np.float64)
      out[f'{e}/momentum_stats/{name}'] = np.stack([_stats(m) for m in moms])
    elif name.endswith(('running_mean', 'running_var',
                        'num_batches_tracked')):
      out[f'{e}/model/{name}'] = np.stack(values)
  for group in ('meta_net', 'adam/exp_avg', 'adam/exp_avg_sq'):
    for name in first[group]:
      out[f'{e}/{group}/{name}'] = np.stack(
          [np.asarray(s[group][name], np.float64) for s in snapshots])
  for name in first['meta_net']:
    out[f'{e}/adam/step/{name}'] = np.array(
        [s['adam_step'] for s in snapshots], np.float64)

  def per_half(key, fill, dtype=np.float64):
    shape = next(np.shape(h[key]) for s in snapshots for h in s['halves']
                 if key in h)
    rows = [[np.asarray(h[key], dtype) if key in h else
             np.full(shape, fill, dtype) for h in s['halves']]
            for s in snapshots]
    return np.array(rows, dtype)

  for key in ('weights', 'meta_net_input', 'exit_losses', 'train_loss'):
    out[f'{e}/{key}'] = per_half(key, np.nan)
  if any(s['meta_step'] for s in snapshots):
    for key in ('pseudo_weights', 'meta_net_input_pseudo', 'meta_loss'):
      out[f'{e}/{key}'] = per_half(key, np.nan)
    out[f'{e}/exit_assignment'] = per_half('exit_assignment', -1, np.int64)
    names = next(h['meta_grad'] for s in snapshots for h in s['halves']
                 if 'meta_grad' in h)
    for name, like in names.items():
      out[f'{e}/meta_grad/{name}'] = np.array(
          [[np.asarray(h['meta_grad'][name], np.float64) if 'meta_grad' in h
            else np.full(np.shape(like), np.nan) for h in s['halves']]
           for s in snapshots])
  return out


def _at(entries: dict, t: int) -> dict:
  return {k: v[t] for k, v in entries.items()}


def _stats_error(computed: dict, expected: dict) -> float:
  """Per tensor |dSum x|/Sum|x|, |dSum|x||/Sum|x|, |dSum x^2|/Sum x^2: the
  worst over tensors and the three."""
  worst = 0.0
  for key, want in expected.items():
    if key not in computed:
      return float('inf')
    got = np.asarray(computed[key], np.float64)
    want = np.asarray(want, np.float64)
    scale = np.array([want[1], want[1], want[2]])
    err = np.abs(got - want) / np.maximum(scale, 1e-300)
    worst = max(worst, float(np.max(err)))
  return worst


def _checks(fixture: Fixture, computed: dict, num_iterations: int):
  """Every expected entry compared, each iteration separately."""
  arrays = fixture.arrays
  e = 'expected'
  tol = TOLERANCES
  checks = []

  def under(prefix, suffixes=None):
    return {k: v for k, v in arrays.items() if k.startswith(prefix) and
            (suffixes is None or k.endswith(suffixes))}

  def got(entries):
    return {k: computed[k] for k in entries if k in computed}

  groups = {
      'model_params': (under(f'{e}/model_sample/'), 'norm'),
      'model_stats': (under(f'{e}/model_stats/'), 'stats'),
      'bn_running_stats': (under(f'{e}/model/', ('running_mean',
                                                 'running_var')), 'norm'),
      'momentum': (under(f'{e}/momentum_sample/'), 'norm'),
      'momentum_stats': (under(f'{e}/momentum_stats/'), 'stats'),
      'meta_net': (under(f'{e}/meta_net/'), 'norm'),
      'adam_exp_avg': (under(f'{e}/adam/exp_avg/'), 'norm'),
      'adam_exp_avg_sq': (under(f'{e}/adam/exp_avg_sq/'), 'norm'),
  }
  meta_step = arrays.get(f'{e}/meta_step')
  for t in range(num_iterations):
    it = f'iteration{t + 1}'
    for name, (expected, metric) in groups.items():
      if not expected:
        continue
      want = _at(expected, t)
      have = _at(got(expected), t)
      err = (relative_norm_error(have, want) if metric == 'norm' else
             _stats_error(have, want))
      checks.append(Check(f'{it}/{name}', err, tol[name],
                          'relative norm' if metric == 'norm' else
                          'per-tensor sums, worst'))
    for name in ('lr', 'meta_lr'):
      key = f'{e}/{name}'
      if key in arrays:
        checks.append(Check(f'{it}/{name}', relative_error(
            computed[key][t], arrays[key][t]), tol['lr'], 'relative'))
    exact = [f'{e}/meta_step', f'{e}/epoch', f'{e}/batch_index']
    exact += list(under(f'{e}/adam/step/'))
    mismatches = sum(mismatch_count(computed[k][t], arrays[k][t])
                     for k in exact if k in arrays)
    checks.append(Check(f'{it}/schedule_and_adam_step', mismatches, 0.0,
                        'meta step, epoch, batch, Adam steps: entries that '
                        'differ'))
    with_meta = bool(meta_step[t]) if meta_step is not None else True
    for h in range(2):
      half = f'{it}/half{h + 1}'
      names = ['weights', 'pseudo_weights'] if with_meta else ['weights']
      for name in names:
        key = f'{e}/{name}'
        if key in arrays:
          err, _ = max_abs_error({key: computed[key][t, h]},
                                 {key: arrays[key][t, h]})
          checks.append(Check(f'{half}/{name}', err, tol['weights'],
                              'max abs'))
      inputs = ['meta_net_input'] + (['meta_net_input_pseudo'] if with_meta
                                     else [])
      for name in inputs:
        key = f'{e}/{name}'
        if key in arrays:
          want = np.asarray(arrays[key][t, h], np.float64)
          err = float(np.max(np.abs(computed[key][t, h] - want)) /
                      np.max(np.abs(want)))
          checks.append(Check(f'{half}/{name}', err, tol['meta_net_input'],
                              'max abs / max |ref|'))
      losses = ['train_loss'] + (['meta_loss'] if with_meta else [])
      for name in losses:
        key = f'{e}/{name}'
        if key in arrays:
          checks.append(Check(f'{half}/{name}', relative_error(
              computed[key][t, h], arrays[key][t, h]), tol['losses'],
                              'relative'))
      key = f'{e}/exit_losses'
      if key in arrays:
        checks.append(Check(f'{half}/exit_losses', relative_norm_error(
            {key: computed[key][t, h]}, {key: arrays[key][t, h]}),
                            tol['losses'], 'relative norm'))
      if with_meta:
        key = f'{e}/exit_assignment'
        if key in arrays:
          checks.append(Check(f'{half}/exit_assignment', mismatch_count(
              computed[key][t, h], arrays[key][t, h]), 0.0,
                              'entries that differ'))
        expected = under(f'{e}/meta_grad/')
        if expected:
          want = {k: v[t, h] for k, v in expected.items()}
          have = {k: computed[k][t, h] for k in expected if k in computed}
          checks.append(Check(f'{half}/meta_grad',
                              relative_norm_error(have, want),
                              tol['meta_grad'], 'relative norm'))
  if under(f'{e}/model/', 'num_batches_tracked'):
    checks.append(NotCompared(
        'model/num_batches_tracked',
        'derived from the initial count (+1 per half), not computed'))
  return checks
