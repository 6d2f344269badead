"""Properties of the L2W half step and iteration on a tiny model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from l2w_jax.meta import l2w
from l2w_jax.training.learner import build_learner, init_train_state
from tests.tiny import TINY_IMAGE, tiny_config


def _setup(**meta):
  learner = build_learner(tiny_config(**meta))
  state = init_train_state(learner, jax.random.PRNGKey(0), TINY_IMAGE)
  images = jax.random.normal(jax.random.PRNGKey(1), (10,) + TINY_IMAGE)
  labels = jnp.arange(10) % 5
  return learner, state, images, labels


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(
      jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_epsilon_zero_gives_the_uniform_update():
  learner, state, images, labels = _setup(epsilon=0.0)
  (xt, yt), (xm, ym) = l2w.split_halves(images, labels)
  weighted, metrics = jax.jit(functools.partial(
      l2w.l2w_half_step, learner, with_meta=True))(state, xt, yt, xm, ym,
                                                   0.1, 1e-2)
  uniform, _ = jax.jit(functools.partial(l2w.uniform_half_step, learner))(
      state, xt, yt, 0.1)
  np.testing.assert_allclose(metrics['weights'], 1.0)
  assert _max_diff(weighted.params, uniform.params) < 1e-6
  assert _max_diff(weighted.batch_stats, uniform.batch_stats) < 1e-6
  # The weight net still learned something from the meta step.
  assert _max_diff(weighted.meta_params, state.meta_params) > 0


def test_iteration_without_meta_step_keeps_the_weight_net():
  learner, state, images, labels = _setup()
  step = jax.jit(functools.partial(l2w.l2w_half_step, learner),
                 static_argnames='with_meta')
  new, (first, second) = l2w.l2w_iteration(step, state, images, labels, 0.1,
                                           1e-2, with_meta=False)
  assert int(new.step) == 1
  assert _max_diff(new.meta_params, state.meta_params) == 0.0
  assert _max_diff(new.params, state.params) > 0
  assert 'meta_loss' not in first and first['weights'].shape == (5, 3)
  assert second['correct'].shape == (3,)


def test_iteration_with_meta_step_reports_everything():
  learner, state, images, labels = _setup(constraint='row')
  step = jax.jit(functools.partial(l2w.l2w_half_step, learner),
                 static_argnames='with_meta')
  new, (first, second) = l2w.l2w_iteration(step, state, images, labels, 0.1,
                                           1e-2, with_meta=True)
  for metrics in (first, second):
    assert metrics['pseudo_weights'].shape == (5, 3)
    assert metrics['exit_assignment'].shape == (5,)
    np.testing.assert_allclose(np.mean(metrics['weights'], axis=0), 1.0,
                               atol=1e-6)  # 'row' centring
    assert np.isfinite(float(metrics['meta_loss']))
  assert _max_diff(new.meta_params, state.meta_params) > 0


def test_halves_split_like_torch_chunk():
  (a, _), (b, _) = l2w.split_halves(jnp.arange(7), jnp.arange(7))
  assert a.tolist() == [0, 1, 2, 3] and b.tolist() == [4, 5, 6]
