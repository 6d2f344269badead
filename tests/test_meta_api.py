"""The public meta-gradient (`l2w_jax.meta.api`): second order against
central differences for several inner steps and both virtual parameter
sets, and the first-order variant against its closed form (float64, tiny
MSDNet)."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2w_jax import parallel
from l2w_jax.meta import api
from l2w_jax.methods import l2w
from l2w_jax.training import forward
from l2w_jax.training import step as step_lib
from l2w_jax.training.learner import build_learner, init_train_state
from tests.tiny import (TINY_IMAGE, float64_meta_problem, tiny_config,
                        tiny_ranet_config)

LR = 0.5


def _problem(**train):
  """(learner, state, train batch, meta batch) in float64."""
  config = tiny_config()
  for key, value in train.items():
    config.train[key] = value
  return float64_meta_problem(config)


def _pieces(learner, state, train_batch, meta_batch, **options):
  pieces = l2w.meta_pieces(learner, state)
  pieces['options'] = api.MetaOptions(**options)
  return dict(pieces, train_batch=train_batch, meta_batch=meta_batch,
              learning_rate=jnp.float64(LR))


def _directional(tree, direction) -> float:
  return sum(float(jnp.vdot(a, b)) for a, b in zip(
      jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(direction),
      strict=True))


# (1, 'all') is tests/test_meta_gradient.py's case.
@pytest.mark.parametrize('inner_steps,virtual_params', [
    (2, 'all'), (1, 'heads'), (2, 'heads')])
def test_meta_gradient_matches_central_differences(float64, inner_steps,
                                                   virtual_params):
  del float64
  learner, state, train_batch, meta_batch = _problem()
  kwargs = _pieces(learner, state, train_batch, meta_batch,
                   inner_steps=inner_steps, virtual_params=virtual_params)
  loss = jax.jit(lambda mp: api.meta_loss(mp, **kwargs))
  (value, (_, assignment)), grads = jax.jit(
      lambda mp: api.meta_gradient(mp, **kwargs))(state.meta_params)
  assert np.isfinite(float(value))
  assert max(float(jnp.max(jnp.abs(g)))
             for g in jax.tree_util.tree_leaves(grads)) > 0
  rng = np.random.default_rng(inner_steps)
  h = 1e-7  # small: ReLU kinks of the backbone must stay outside [-h, h]
  for trial in range(2):
    direction = jax.tree_util.tree_map(
        lambda g: jnp.asarray(rng.normal(size=g.shape)), grads)
    shifted = [jax.tree_util.tree_map(lambda p, d, s=s: p + s * h * d,
                                      state.meta_params, direction)
               for s in (1.0, -1.0)]
    (f_plus, (_, a_plus)), (f_minus, (_, a_minus)) = map(loss, shifted)
    # The allocation is piecewise constant: no switch inside the step.
    np.testing.assert_array_equal(a_plus, assignment)
    np.testing.assert_array_equal(a_minus, assignment)
    numeric = (float(f_plus) - float(f_minus)) / (2 * h)
    analytic = _directional(grads, direction)
    assert abs(numeric - analytic) <= 1e-6 * abs(analytic), (
        trial, numeric, analytic)


def test_more_inner_steps_and_heads_only_change_the_gradient(float64):
  del float64
  learner, state, train_batch, meta_batch = _problem()
  def grads(**options):
    kwargs = _pieces(learner, state, train_batch, meta_batch, **options)
    return jax.jit(lambda mp: api.meta_gradient(mp, **kwargs)[1])(
        state.meta_params)
  one, two, heads = grads(), grads(inner_steps=2), grads(
      virtual_params='heads')
  first_order_one = grads(first_order=True)
  for other in (two, heads):
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(other))) > 1e-6
  # One inner step: theta_0 does not depend on phi, first order is exact.
  for a, b in zip(jax.tree_util.tree_leaves(one),
                  jax.tree_util.tree_leaves(first_order_one)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_first_order_two_steps_match_the_closed_form(float64):
  """Plain SGD (no momentum, no decay), two inner steps, first order:
  theta_2 = theta_0 - lr g_0 - lr g_1 with g_t = J_t^T w_t / B and J_t held
  constant, so d meta / d phi = -lr / B sum_t (d w_t / d phi)^T (J_t v),
  v = d meta / d theta at theta_2 and J_t v the losses' JVP along v."""
  del float64
  learner, state, train_batch, meta_batch = _problem(momentum=0.0,
                                                     weight_decay=0.0)
  kwargs = _pieces(learner, state, train_batch, meta_batch, inner_steps=2,
                   first_order=True)
  got = jax.jit(lambda mp: api.meta_gradient(mp, **kwargs)[1])(
      state.meta_params)

  losses_fn, weight_fn = kwargs['losses_fn'], kwargs['weight_fn']
  x, y = train_batch
  phi = state.meta_params
  thetas = [state.params]
  for _ in range(2):
    losses, logits = losses_fn(thetas[-1], x, y)
    weights = weight_fn(phi, losses, logits)
    g = jax.grad(lambda p, w=weights: jnp.sum(jnp.mean(
        w * losses_fn(p, x, y)[0], axis=0)))(thetas[-1])
    thetas.append(jax.tree_util.tree_map(lambda p, d: p - LR * d,
                                         thetas[-1], g))

  def meta_of_theta(theta):
    meta_losses, meta_logits = kwargs['meta_losses_fn'](theta, *meta_batch)
    return kwargs['objective_fn'](meta_logits, meta_losses, meta_batch[1])[0]

  v = jax.grad(meta_of_theta)(thetas[2])
  want = jax.tree_util.tree_map(jnp.zeros_like, phi)
  for theta in thetas[:2]:
    losses, logits = losses_fn(theta, x, y)
    # J_t v as the gradient of u -> <J_t^T u, v> (reverse over reverse:
    # the convolutions' explicit rules on CPU have no forward mode).
    _, losses_vjp = jax.vjp(lambda p: losses_fn(p, x, y)[0], theta)
    tangent = jax.grad(lambda u: sum(
        jnp.vdot(a, b) for a, b in zip(
            jax.tree_util.tree_leaves(losses_vjp(u)[0]),
            jax.tree_util.tree_leaves(v), strict=True)))(
                jnp.zeros_like(losses))
    _, weight_vjp = jax.vjp(lambda mp: weight_fn(mp, losses, logits), phi)
    term, = weight_vjp(tangent * (-LR / x.shape[0]))
    want = jax.tree_util.tree_map(jnp.add, want, term)
  for a, b in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13)


def test_bad_meta_options_are_named():
  with pytest.raises(ValueError, match='meta.inner_steps: must be an integer'):
    api.MetaOptions(inner_steps=0)
  with pytest.raises(ValueError, match="meta.virtual_params: use one of"):
    api.MetaOptions(virtual_params='blocks')
  config = tiny_config()
  config.meta.virtual_params = 'heads'
  assert build_learner(config).option(l2w.OPTION).meta_options == dataclasses.replace(
      api.MetaOptions(), virtual_params='heads')


def _half_step_with_remat(config, remat: bool):
  """(initial params, params after one L2W half step, its meta-gradient)."""
  config.meta.remat = remat
  learner = build_learner(config)
  assert learner.model.cfg.remat == remat
  state = init_train_state(learner, jax.random.PRNGKey(0), TINY_IMAGE)
  images = jax.random.normal(jax.random.PRNGKey(1), (8,) + TINY_IMAGE)
  labels = jnp.arange(8) % 5
  (xt, yt), (xm, ym) = forward.split_halves(images, labels)
  # Compiled as the training step is (remat's barriers kept on CPU).
  step = jax.jit(functools.partial(l2w.l2w_half_step, learner),
                 static_argnames='with_meta',
                 compiler_options=parallel.compiler_options(
                     remat, jax.default_backend()))
  new_state, metrics = step(state, xt, yt, xm, ym, 0.1, 1e-2, with_meta=True)
  return state.params, new_state.params, metrics['meta_grads']


def test_remat_changes_memory_not_values():
  """meta.remat on the MSDNet: the same parameters (names, shapes, init)
  and the same L2W half step, meta-gradient included, to float32
  rounding."""
  init_a, params_a, meta_a = _half_step_with_remat(tiny_config(), False)
  init_b, params_b, meta_b = _half_step_with_remat(tiny_config(), True)
  chex.assert_trees_all_equal(init_a, init_b)
  chex.assert_trees_all_close(params_a, params_b, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(meta_a, meta_b, rtol=1e-4, atol=1e-7)
  assert max(float(jnp.max(jnp.abs(g)))
             for g in jax.tree_util.tree_leaves(meta_a)) > 1e-6


def test_remat_on_ranet_gives_the_same_gradient():
  """RANet's blocks under remat (their `train` argument static): the
  same parameters and the same gradient of the summed exit losses."""
  grads = []
  for remat in (False, True):
    config = tiny_ranet_config()
    config.meta.remat = remat
    model = build_learner(config).model
    assert model.cfg.remat == remat
    images = jax.random.normal(jax.random.PRNGKey(1), (4,) + TINY_IMAGE)
    variables = model.init(jax.random.PRNGKey(0), images, train=False)
    losses_fn = api.backbone_loss_fn(model, variables['batch_stats'])
    grads.append((variables['params'], jax.jit(jax.grad(
        lambda p: jnp.sum(losses_fn(p, images, jnp.arange(4))[0])))(
            variables['params'])))
  chex.assert_trees_all_equal(grads[0][0], grads[1][0])
  chex.assert_trees_all_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-6)


def test_remat_lowers_the_memory_of_the_training_step():
  """The training loop's compiled L2W half step (`training.step`, one
  device, tiny MSDNet) keeps fewer bytes of temporaries with meta.remat; on CPU only
  because `parallel.compiler_options` keeps remat's barriers. Measured at
  16 images a half: MSDNet 12.9 -> 11.0 MB, RANet 18.1 -> 13.9 MB; without
  those options remat gives 12.6 and 18.5 MB."""
  mesh = parallel.make_mesh(1)
  temp_bytes = {}
  for remat in (False, True):
    config = tiny_config()
    config.meta.remat = remat
    learner = build_learner(config)
    state = init_train_state(learner, jax.random.PRNGKey(0), TINY_IMAGE)
    images = jnp.zeros((16,) + TINY_IMAGE)
    labels = jnp.arange(16) % 5
    step = step_lib.sharded_half_step(
        l2w.l2w_half_step, step_lib.data_parallel_learner(learner), mesh)
    compiled = step.lower(state, images, labels, images, labels, 0.1, 1e-2,
                          with_meta=True).compile()
    temp_bytes[remat] = compiled.memory_analysis().temp_size_in_bytes
  assert temp_bytes[True] < 0.92 * temp_bytes[False], temp_bytes
