"""Checks of a config before anything is built or compiled: every number a
run reads, the evaluation protocol, the reduction, the schedule and the
method's name. Each failure is one line naming the field."""

from __future__ import annotations

import ml_collections
import numpy as np

from l2w_jax import parallel
from l2w_jax.data import settings as data_settings
from l2w_jax.meta.weighting import NUM_BUDGETS
from l2w_jax.training import registry
from l2w_jax.training import schedules


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(
      np.isfinite(v))


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


# (field, allowed range in words, test): every number a run reads, checked
# before anything compiles. NaN fails every test (comparisons are False).
_NUMERIC_FIELDS = (
    ('seed', 'an integer', _is_int),
    ('meta.epsilon', '>= 0', lambda v: _finite(v) and v >= 0),
    ('meta.lr', 'finite and > 0', lambda v: _finite(v) and v > 0),
    ('meta.weight_decay', 'finite and >= 0', lambda v: _finite(v) and v >= 0),
    ('meta.hidden_size', 'an integer >= 1', lambda v: _is_int(v) and v >= 1),
    ('meta.num_layers', 'an integer >= 1', lambda v: _is_int(v) and v >= 1),
    ('meta.interval', 'an integer >= 1', lambda v: _is_int(v) and v >= 1),
    ('meta.target_p_index', f'an integer in [1, {NUM_BUDGETS}]',
     lambda v: _is_int(v) and 1 <= v <= NUM_BUDGETS),
    ('train.lr', 'finite and > 0', lambda v: _finite(v) and v > 0),
    ('train.momentum', 'in [0, 1)', lambda v: _finite(v) and 0 <= v < 1),
    ('train.weight_decay', 'finite and >= 0', lambda v: _finite(v) and v >= 0),
    ('train.label_smoothing', 'in [0, 1)',
     lambda v: _finite(v) and 0 <= v < 1),
    ('train.lr_gamma', 'finite and > 0', lambda v: _finite(v) and v > 0),
    ('train.batch_size', 'an integer > 0 (or set per_device_batch_size)',
     lambda v: _is_int(v) and v > 0),
    ('train.per_device_batch_size', 'an integer >= 0 (0: from batch_size)',
     lambda v: _is_int(v) and v >= 0),
    ('train.epochs', 'an integer >= 0', lambda v: _is_int(v) and v >= 0),
    ('train.num_steps', 'an integer (> 0 overrides epochs)', _is_int),
    ('train.keep_checkpoints', 'an integer >= 1',
     lambda v: _is_int(v) and v >= 1),
    ('train.log_every_steps', 'an integer >= 1',
     lambda v: _is_int(v) and v >= 1),
    ('train.checkpoint_every_steps', 'an integer >= 1',
     lambda v: _is_int(v) and v >= 1),
    ('train.eval_every_epochs', 'an integer >= 0 (0: only the final one)',
     lambda v: _is_int(v) and v >= 0),
    ('distributed.heartbeat_timeout_seconds', 'an integer >= 1',
     lambda v: _is_int(v) and v >= 1),
    ('distributed.initialization_timeout_seconds', 'an integer >= 1',
     lambda v: _is_int(v) and v >= 1),
    ('train.phase_split', 'in (0, 1)', lambda v: _finite(v) and 0 < v < 1),
    ('dataset.holdout', 'an integer >= 0', lambda v: _is_int(v) and v >= 0),
    ('eval.threshold_images', 'an integer >= 0 (0: every training image)',
     lambda v: _is_int(v) and v >= 0),
    ('eval.batch_size', 'an integer > 0', lambda v: _is_int(v) and v > 0),
)


def _field(config, path: str):
  node = config
  for key in path.split('.'):
    if key not in node:
      return None
    node = node[key]
  return node


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one line: the field, its value, the allowed range)
  for a config that cannot run, before anything is built or compiled."""
  registry.get(config.method)  # raises naming the available methods
  per_device = _field(config, 'train.per_device_batch_size')
  for path, allowed, ok in _NUMERIC_FIELDS:
    value = _field(config, path)
    if (path == 'train.batch_size' and _is_int(per_device) and
        per_device > 0):
      continue  # the global batch comes from the per-device one
    if value is not None and not ok(value):
      raise ValueError(f'{path}: must be {allowed}, got {value!r}')
  data_settings.settings_from_config(config)  # protocol, holdout, last batch
  if config.train.num_steps <= 0 and config.train.epochs <= 0:
    raise ValueError('train.epochs or train.num_steps must be positive')
  reduction = reduction_of(config)
  if reduction not in parallel.REDUCTIONS:
    raise ValueError(f'distributed.reduction: unknown reduction '
                     f'{reduction!r}; use one of {parallel.REDUCTIONS}')
  if reduction == 'ordered' and config.train.sync_bn:
    raise ValueError('distributed.reduction=ordered does not cover '
                     'train.sync_bn (its statistics are all-reduced): set '
                     'one of them back to its default')
  schedules.check_schedule(config.train)


def reduction_of(config) -> str:
  return config.distributed.get('reduction', 'all_reduce')
