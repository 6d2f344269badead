"""Properties of the L2W half step and iteration on a tiny model."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2w_jax.methods import l2w
from l2w_jax.methods import uniform
from l2w_jax.optim import apply_optimizer
from l2w_jax.training import forward
from l2w_jax.training.learner import build_learner, init_train_state
from l2w_jax.training.state import TrainState
from tests.tiny import TINY_IMAGE, tiny_config


def _setup(**meta):
  learner = build_learner(tiny_config(**meta))
  state = init_train_state(learner, jax.random.PRNGKey(0), TINY_IMAGE)
  images = jax.random.normal(jax.random.PRNGKey(1), (10,) + TINY_IMAGE)
  labels = jnp.arange(10) % 5
  return learner, state, images, labels


def _max_diff(a, b):
  """Largest |a - b| over two trees of the same structure (checked)."""
  chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(
      jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _half_step(learner, **kwargs):
  return jax.jit(functools.partial(l2w.l2w_half_step, learner, **kwargs),
                 static_argnames='with_meta')


def test_epsilon_zero_gives_the_uniform_update():
  learner, state, images, labels = _setup(epsilon=0.0)
  (xt, yt), (xm, ym) = forward.split_halves(images, labels)
  weighted, metrics = jax.jit(functools.partial(
      l2w.l2w_half_step, learner, with_meta=True))(state, xt, yt, xm, ym,
                                                   0.1, 1e-2)
  plain, _ = jax.jit(functools.partial(uniform.uniform_half_step, learner))(
      state, xt, yt, 0.1)
  np.testing.assert_allclose(metrics['weights'], 1.0)
  chex.assert_trees_all_close(weighted.params, plain.params, atol=1e-6)
  chex.assert_trees_all_close(weighted.batch_stats, plain.batch_stats,
                              atol=1e-6)
  # The weight net still learned something from the meta step.
  assert _max_diff(weighted.meta_params, state.meta_params) > 0


def test_iteration_without_meta_step_keeps_the_weight_net():
  learner, state, images, labels = _setup()
  step = jax.jit(functools.partial(l2w.l2w_half_step, learner),
                 static_argnames='with_meta')
  new, (first, second) = l2w.l2w_iteration(step, state, images, labels, 0.1,
                                           1e-2, with_meta=False)
  assert int(new.step) == 1
  chex.assert_trees_all_equal(new.meta_params, state.meta_params)
  chex.assert_trees_all_equal(new.meta_opt_state, state.meta_opt_state)
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
  (a, _), (b, _) = forward.split_halves(jnp.arange(7), jnp.arange(7))
  assert a.tolist() == [0, 1, 2, 3] and b.tolist() == [4, 5, 6]


def test_real_step_weights_come_from_the_updated_weight_net():
  """Order inside a half: meta update first, then the real step's weights
  are predicted by the *updated* weight net (as constants)."""
  learner, state, images, labels = _setup()
  (xt, yt), (xm, ym) = forward.split_halves(images, labels)
  new, metrics = _half_step(learner)(state, xt, yt, xm, ym, 0.1, 1e-2,
                                     with_meta=True)
  losses, _ = jax.jit(functools.partial(forward.backbone_losses, learner.model))(
      state.params, state.batch_stats, xt, yt)
  np.testing.assert_allclose(metrics['losses'], losses, rtol=1e-6)
  updated = l2w.predict_weights(learner, new.meta_params, losses)
  before = l2w.predict_weights(learner, state.meta_params, losses)
  np.testing.assert_allclose(metrics['weights'], updated, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(metrics['pseudo_weights'], before, rtol=1e-5,
                             atol=1e-6)
  # The meta update moved the prediction by far more than the tolerances.
  assert float(jnp.max(jnp.abs(updated - before))) > 1e-3
  # The real step is SGD on sum_k mean_b(w_bk L_bk) with those weights.

  @jax.jit
  def sgd_step(params):
    grads = jax.grad(lambda p: forward.weighted_loss(updated, forward.backbone_losses(
        learner.model, p, state.batch_stats, xt, yt)[0]))(params)
    return apply_optimizer(learner.tx, grads, state.opt_state, params,
                               0.1)[0]

  params = sgd_step(state.params)
  chex.assert_trees_all_close(new.params, params, atol=1e-6, rtol=1e-5)


def test_iteration_trains_on_each_half_with_the_other_as_meta_data():
  """Half 1: train p1, meta p2; half 2: train p2, meta p1 (not its own)."""
  calls = []

  def recording_half_step(state, xt, yt, xm, ym, lr, meta_lr, with_meta):
    calls.append((np.asarray(xt), np.asarray(yt), np.asarray(xm),
                  np.asarray(ym), lr, meta_lr, with_meta))
    return state, {}

  state = TrainState(step=jnp.zeros((), jnp.int32), params={},
                         batch_stats={}, opt_state=(), meta_params={},
                         meta_opt_state=())
  images = jnp.arange(7, dtype=jnp.float32)[:, None] * jnp.ones((7, 2))
  labels = jnp.arange(7)
  new, _ = l2w.l2w_iteration(recording_half_step, state, images, labels, 0.3,
                             0.01, with_meta=True)
  assert int(new.step) == 1 and len(calls) == 2
  first, second = calls
  assert first[1].tolist() == [0, 1, 2, 3] and first[3].tolist() == [4, 5, 6]
  assert second[1].tolist() == [4, 5, 6] and second[3].tolist() == [0, 1, 2, 3]
  np.testing.assert_array_equal(first[0], second[2])
  np.testing.assert_array_equal(first[2], second[0])
  assert [c[4:] for c in calls] == [(0.3, 0.01, True)] * 2


def test_iteration_equals_two_explicit_half_steps():
  learner, state, images, labels = _setup()
  step = _half_step(learner)
  (x1, y1), (x2, y2) = forward.split_halves(images, labels)
  expected, _ = step(state, x1, y1, x2, y2, 0.1, 1e-2, with_meta=True)
  expected, _ = step(expected, x2, y2, x1, y1, 0.1, 1e-2, with_meta=True)
  # The same first half with half 2 using its own train half as meta data.
  wrong, _ = step(state, x1, y1, x2, y2, 0.1, 1e-2, with_meta=True)
  wrong, _ = step(wrong, x2, y2, x2, y2, 0.1, 1e-2, with_meta=True)
  new, _ = l2w.l2w_iteration(step, state, images, labels, 0.1, 1e-2,
                             with_meta=True)
  chex.assert_trees_all_equal(new.replace(step=expected.step), expected)
  assert _max_diff(wrong.meta_params, expected.meta_params) > 1e-6


def _guarded_half_step(learner, max_traces):
  """`l2w_half_step` jitted behind a chex trace counter."""

  @chex.assert_max_traces(n=max_traces)
  def half_step(state, train_images, train_labels, meta_images, meta_labels,
                learning_rate, meta_learning_rate, with_meta=True):
    return l2w.l2w_half_step(learner, state, train_images, train_labels,
                             meta_images, meta_labels, learning_rate,
                             meta_learning_rate, with_meta)

  return jax.jit(half_step, static_argnames='with_meta')


def test_half_step_compiles_once_per_meta_setting():
  """Changing learning rates, data or state values must not retrace."""
  learner, state, images, labels = _setup()
  step = _guarded_half_step(learner, max_traces=2)
  try:
    for i, with_meta in enumerate([True, False, True, False, True]):
      lr = 0.1 / (i + 1)  # a Python float, as the training loop passes it
      state, _ = l2w.l2w_iteration(step, state, images + i, labels, lr,
                                   1e-2 * lr, with_meta=with_meta)
  finally:
    chex.clear_trace_counter()


def test_meta_interval_below_one_is_refused():
  with pytest.raises(ValueError, match='meta.interval: must be >= 1, got 0'):
    build_learner(tiny_config(interval=0))


def test_target_probs_default_to_the_index_rule_and_are_checked():
  from_index = build_learner(tiny_config()).option(l2w.OPTION).target_probs
  np.testing.assert_allclose(sum(from_index), 1.0, rtol=1e-6)
  num_exits = len(from_index)
  given = tuple([0.5] + [0.5 / (num_exits - 1)] * (num_exits - 1))
  learner = build_learner(tiny_config(target_probs=given))
  assert learner.option(l2w.OPTION).target_probs == tuple(
      float(q) for q in np.float32(given))
  for bad in (given[:-1], (1.5,) + (-0.5,) + given[2:],
              (0.5,) * num_exits):
    with pytest.raises(ValueError, match='meta.target_probs: '):
      build_learner(tiny_config(target_probs=bad))
