"""BatchNorm's one-pass derivative (`models/batch_norm.py`) against JAX's
differentiation of the normalisation: the same forward (bit for bit), first
and second derivatives to float64 rounding, through all three outputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2w_jax.models import batch_norm, layers


def _close(a, b, rtol=1e-12):
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                  strict=True):
    scale = float(jnp.max(jnp.abs(v))) or 1.0
    np.testing.assert_allclose(u, v, rtol=0, atol=rtol * scale)


def _inputs(shape):
  kx, ks, kb, kw = jax.random.split(jax.random.PRNGKey(sum(shape)), 4)
  c = shape[-1]
  x = 3 * jax.random.normal(kx, shape, jnp.float64) + 1
  scale = jax.random.normal(ks, (c,), jnp.float64)
  bias = jax.random.normal(kb, (c,), jnp.float64)
  probe = jax.random.normal(kw, shape, jnp.float64)
  return x, scale, bias, probe


def _loss(one_pass, probe, x, scale, bias):
  """Reads every output, the statistics non-linearly."""
  y, mean, var = batch_norm.normalise_batch(x, scale, bias, 1e-5, one_pass)
  return (jnp.sum(jnp.tanh(y) * probe) + jnp.sum(jnp.square(mean)) +
          jnp.sum(jnp.sin(var)))


@pytest.mark.parametrize('shape', [(4, 3, 5, 6), (9, 2), (2, 1, 1, 3)])
def test_one_pass_derivatives_match_jax(float64, shape):
  """Forward, gradient, and the gradient of a function of the gradient
  (reverse over reverse, as in the meta step) w.r.t. x, scale and bias."""
  del float64
  x, scale, bias, probe = _inputs(shape)
  for want, got in zip(
      batch_norm.normalise_batch(x, scale, bias, 1e-5, False),
      batch_norm.normalise_batch(x, scale, bias, 1e-5, True), strict=True):
    np.testing.assert_array_equal(got, want)

  def grads(one_pass, x, scale, bias):
    return jax.grad(functools.partial(_loss, one_pass, probe),
                    argnums=(0, 1, 2))(x, scale, bias)

  _close(grads(True, x, scale, bias), grads(False, x, scale, bias))

  def second(one_pass, x, scale, bias):
    gx, gs, gb = grads(one_pass, x, scale, bias)
    return jnp.sum(jnp.sin(gx)) + jnp.sum(jnp.cos(gs) * gb)

  want = jax.grad(functools.partial(second, False), argnums=(0, 1, 2))(
      x, scale, bias)
  got = jax.grad(functools.partial(second, True), argnums=(0, 1, 2))(
      x, scale, bias)
  _close(got, want)


def test_the_layer_takes_the_rule_with_the_explicit_convolution_rules():
  """BatchNorm2d in train mode: the one-pass rule (a custom VJP, so no
  forward mode) with 'explicit' and on CPU with 'auto'; JAX's with
  'lax'."""
  x = jnp.ones((2, 3, 3, 4)) + jnp.arange(4.0)

  def tangent(gradients):
    bn = layers.BatchNorm2d(4, gradients=gradients)
    variables = bn.init(jax.random.PRNGKey(0), x, True)
    return jax.jvp(lambda v: bn.apply(variables, v, True), (x,), (x,))[1]

  tangent('lax')
  for gradients in ('explicit', 'auto'):
    with pytest.raises(TypeError, match='custom_vjp'):
      tangent(gradients)
