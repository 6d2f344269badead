"""Fixtures of kind `forward`: per-exit logits in eval and train mode, and the
running statistics after one train-mode forward pass."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from l2w_jax.convert.torch_state import (flax_to_torch, torch_to_flax,
                                         variables_template)
from l2w_jax.reference.fixtures import (Check, Fixture, fixture_model,
                                        max_abs_error, nchw_to_nhwc)

LOGIT_TOLERANCE = 1e-4  # times max(1, max |expected|)
STATS_TOLERANCE = 1e-5


def run_forward_fixture(fixture: Fixture):
  """Returns (computed entries under the fixture's key names, checks)."""
  fixture.require(['x'])
  model_state = fixture.group('model')
  if not model_state:
    fixture.require(['model/<parameter name>'])
  dtype = fixture.compute_dtype
  model = fixture_model(fixture.config)
  images = jnp.asarray(nchw_to_nhwc(fixture.arrays['x']).astype(dtype))
  variables = torch_to_flax(model_state, variables_template(model, images),
                            dtype=dtype)
  eval_logits = model.apply(variables, images, train=False)
  train_logits, mutated = model.apply(variables, images, train=True,
                                      mutable=['batch_stats'])
  after = flax_to_torch({'params': variables['params'],
                         'batch_stats': mutated['batch_stats']})
  computed = {}
  for mode, logits in (('eval_logits', eval_logits),
                       ('train_logits', train_logits)):
    for k, z in enumerate(logits):
      computed[f'expected/{mode}/{k}'] = np.asarray(z)
  for name, value in after.items():
    if name.endswith(('running_mean', 'running_var')):
      computed[f'expected/after_train_forward/model/{name}'] = value

  checks = []
  for mode in ('eval_logits', 'train_logits'):
    expected = {k: v for k, v in fixture.arrays.items()
                if k.startswith(f'expected/{mode}/')}
    if expected:
      scale = max(1.0, max(float(np.max(np.abs(v))) for v in
                           expected.values()))
      err, where = max_abs_error(computed, expected)
      checks.append(Check(mode, err, LOGIT_TOLERANCE * scale, where))
  expected = {k: v for k, v in fixture.arrays.items()
              if k.startswith('expected/after_train_forward/')}
  if expected:
    err, where = max_abs_error(computed, expected)
    checks.append(Check('running_stats_after_train_forward', err,
                        STATS_TOLERANCE, where))
  return computed, checks
