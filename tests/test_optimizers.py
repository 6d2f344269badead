"""The virtual / real SGD step and the weight net's Adam against hand-written
PyTorch update rules."""

import jax
import jax.numpy as jnp
import numpy as np

from l2w_jax import optim


def _tree(rng, scale=1.0):
  return {'a': jnp.asarray(rng.normal(size=(3, 4)) * scale),
          'b': {'c': jnp.asarray(rng.normal(size=(5,)) * scale)}}


def test_virtual_step_is_torch_sgd_with_momentum():
  jax.config.update('jax_enable_x64', True)
  try:
    rng = np.random.default_rng(0)
    params, grads, buf = _tree(rng), _tree(rng), _tree(rng, 0.1)
    lr, momentum, wd = 0.37, 0.9, 1e-3
    tx = optim.torch_sgd(0.1, momentum, wd)
    state = optim.with_sgd_momentum(tx.init(params), buf)
    new_params, new_state = optim.apply_optimizer(tx, grads, state,
                                                       params, lr)
    for path in (('a',), ('b', 'c')):
      p, g, m = (np.asarray(_get(t, path)) for t in (params, grads, buf))
      # torch: d = g + wd p; buf = momentum buf + d; p -= lr buf
      want_buf = momentum * m + (g + wd * p)
      np.testing.assert_allclose(_get(new_params, path), p - lr * want_buf,
                                 rtol=1e-14)
      np.testing.assert_allclose(
          _get(optim.sgd_momentum(new_state), path), want_buf,
          rtol=1e-14)
  finally:
    jax.config.update('jax_enable_x64', False)


def test_first_sgd_step_uses_the_gradient_as_buffer():
  params, grads = {'w': jnp.array([1.0, -2.0])}, {'w': jnp.array([0.5, 0.5])}
  tx = optim.torch_sgd(0.1, 0.9, 0.0)
  new_params, _ = optim.apply_optimizer(tx, grads, tx.init(params),
                                             params, 0.1)
  np.testing.assert_allclose(new_params['w'], [0.95, -2.05], rtol=1e-6)


def test_virtual_step_is_differentiable_in_the_gradient():
  params = {'w': jnp.array([1.0, 2.0])}
  tx = optim.torch_sgd(0.1, 0.9, 1e-4)
  state = tx.init(params)

  def after(scale):
    grads = {'w': scale * jnp.array([1.0, 3.0])}
    new, _ = optim.apply_optimizer(tx, grads, state, params, 0.5)
    return jnp.sum(new['w'])

  # d/ds sum(p - lr (s g + wd p)) = -lr sum(g)
  np.testing.assert_allclose(jax.grad(after)(1.0), -0.5 * 4.0, rtol=1e-6)


def test_adam_is_torch_adam_with_l2():
  jax.config.update('jax_enable_x64', True)
  try:
    rng = np.random.default_rng(1)
    params = _tree(rng)
    lr, wd, b1, b2, eps = 1e-3, 1e-2, 0.9, 0.999, 1e-8
    tx = optim.torch_adam(lr, wd)
    state = tx.init(params)
    p = {k: np.asarray(v) for k, v in _flat(params).items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t in range(1, 4):
      grads = _tree(rng)
      params, state = optim.apply_optimizer(tx, grads, state, params, lr)
      for k, g in _flat(grads).items():
        g = np.asarray(g) + wd * p[k]
        m[k] = b1 * m[k] + (1 - b1) * g
        v[k] = b2 * v[k] + (1 - b2) * g * g
        denom = np.sqrt(v[k]) / np.sqrt(1 - b2**t) + eps
        p[k] = p[k] - (lr / (1 - b1**t)) * m[k] / denom
      for k, x in _flat(params).items():
        np.testing.assert_allclose(x, p[k], rtol=1e-12, atol=1e-15)
  finally:
    jax.config.update('jax_enable_x64', False)


def test_learning_rate_is_injected_per_step():
  tx = optim.torch_sgd(0.1, 0.0, 0.0)
  params = {'w': jnp.ones(2)}
  state = tx.init(params)
  new, state = optim.apply_optimizer(tx, {'w': jnp.ones(2)}, state,
                                          params, 0.25)
  np.testing.assert_allclose(new['w'], 0.75)
  assert float(optim.learning_rate_of(state)) == 0.25


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _flat(tree):
  return {'a': tree['a'], 'c': tree['b']['c']}
