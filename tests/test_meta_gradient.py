"""The meta-gradient through the virtual step against finite differences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2w_jax.meta import api
from l2w_jax.methods import l2w
from l2w_jax.training import forward
from l2w_jax.training.learner import build_learner, init_train_state
from tests.tiny import TINY_IMAGE, float64_meta_problem, tiny_config


@pytest.mark.parametrize('input_kind,constraint', [('loss', 'col'),
                                                   ('both', 'mat')])
def test_meta_gradient_matches_finite_differences(float64, input_kind,
                                                  constraint):
  del float64
  config = tiny_config(input=input_kind, constraint=constraint, epsilon=0.8)
  learner, state, (xt, yt), (xm, ym) = float64_meta_problem(config)
  lr = jnp.float64(0.5)

  pieces = l2w.meta_pieces(learner, state)
  objective = jax.jit(lambda mp: api.meta_loss(
      mp, **pieces, train_batch=(xt, yt), meta_batch=(xm, ym),
      learning_rate=lr))

  (value, (_, assignment)), grads = jax.jit(
      jax.value_and_grad(lambda mp: objective(mp), has_aux=True))(
          state.meta_params)
  assert np.isfinite(float(value))
  leaves, treedef = jax.tree_util.tree_flatten(grads)
  rng = np.random.default_rng(0)
  # Small steps: ReLU kinks in the backbone must not fall inside [-h, h].
  h = 1e-7
  for trial in range(3):
    direction = jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(rng.normal(size=g.shape)) for g in leaves])
    plus = jax.tree_util.tree_map(lambda p, d: p + h * d, state.meta_params,
                                  direction)
    minus = jax.tree_util.tree_map(lambda p, d: p - h * d, state.meta_params,
                                   direction)
    (f_plus, (_, a_plus)), (f_minus, (_, a_minus)) = objective(plus), objective(
        minus)
    # The allocation is piecewise constant; the step must not cross a switch.
    np.testing.assert_array_equal(a_plus, assignment)
    np.testing.assert_array_equal(a_minus, assignment)
    numeric = (float(f_plus) - float(f_minus)) / (2 * h)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(
        leaves, jax.tree_util.tree_leaves(direction)))
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (
        trial, numeric, analytic)


def test_meta_gradient_is_not_zero_and_flows_only_through_the_virtual_step(
    float64):
  """With the virtual step's learning rate at 0 the meta loss no longer
  depends on the weight net: its gradient must vanish exactly."""
  del float64
  learner = build_learner(tiny_config())
  state = init_train_state(learner, jax.random.PRNGKey(0), TINY_IMAGE,
                           dtype=jnp.float64)
  images = jax.random.normal(jax.random.PRNGKey(2), (8,) + TINY_IMAGE,
                             jnp.float64)
  labels = jnp.arange(8) % 5
  step = jax.jit(functools.partial(l2w.l2w_half_step, learner),
                 static_argnames='with_meta')
  (xt, yt), (xm, ym) = forward.split_halves(images, labels)
  _, metrics = step(state, xt, yt, xm, ym, 0.0, 1e-3, with_meta=True)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0
             for g in jax.tree_util.tree_leaves(metrics['meta_grads']))
  _, metrics = step(state, xt, yt, xm, ym, 0.5, 1e-3, with_meta=True)
  assert max(float(jnp.max(jnp.abs(g)))
             for g in jax.tree_util.tree_leaves(metrics['meta_grads'])) > 0
