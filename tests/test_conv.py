"""The convolutions' explicit derivative rules (`models/conv.py`) against
JAX's own: the same forward, first- and second-order derivatives to float64
rounding, for every kernel, stride and padding the backbones use, and the
same L2W half step (meta-gradient included) on a whole MSDNet, the same
plain half step on a whole RANet."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2w_jax.methods import l2w, uniform
from l2w_jax.models import conv
from l2w_jax.training import forward
from l2w_jax.training.learner import build_learner
from tests.tiny import float64_step_setup, tiny_config, tiny_ranet_config

# (input (B, H, W, I), kernel k, O, stride, padding): MSDNet's and RANet's
# 1x1, 3x3 / 1 and 3x3 / 2 convs, the ImageNet stem's 7x7 / 2, odd sizes
# (the stride leaves rows unread), a strided 1x1.
CASES = [((2, 6, 6, 3), 1, 4, 1, 0), ((2, 7, 5, 3), 3, 4, 1, 1),
         ((2, 8, 8, 3), 3, 5, 2, 1), ((2, 7, 9, 2), 3, 3, 2, 1),
         ((1, 11, 11, 3), 7, 2, 2, 3), ((2, 5, 5, 3), 1, 2, 2, 0),
         ((2, 4, 4, 2), 3, 3, 2, 0)]


def _inputs(shape, k, out, dtype=jnp.float64):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(sum(shape) + k), 3)
  x = jax.random.normal(kx, shape, dtype)
  w = jax.random.normal(kw, (k, k, shape[-1], out), dtype)
  return x, w, kg


def _close(a, b, rtol=1e-12):
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                  strict=True):
    scale = float(jnp.max(jnp.abs(v))) or 1.0
    np.testing.assert_allclose(u, v, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize('shape,k,out,stride,padding', CASES)
def test_first_and_second_derivatives_match_jax(float64, shape, k, out,
                                                 stride, padding):
  """Forward, gradient, and the gradient of a function of the gradient
  (what the meta step differentiates: reverse over reverse) w.r.t. the
  input, the kernel and the cotangent."""
  del float64
  x, w, kg = _inputs(shape, k, out)

  def value(gradients, x, w):
    return conv.conv2d(x, w, stride, padding, gradients)

  y = value('lax', x, w)
  dy = jax.random.normal(kg, y.shape, y.dtype)
  _close(value('explicit', x, w), y, 0)

  def grads(gradients, x, w, dy):
    _, vjp = jax.vjp(functools.partial(value, gradients), x, w)
    return vjp(dy)

  _close(grads('explicit', x, w, dy), grads('lax', x, w, dy))

  def second(gradients, x, w, dy):
    gx, gw = grads(gradients, x, w, dy)
    return jnp.sum(jnp.sin(gx)) + jnp.sum(jnp.cos(gw) * gw)

  want = jax.grad(functools.partial(second, 'lax'), argnums=(0, 1, 2))(
      x, w, dy)
  got = jax.grad(functools.partial(second, 'explicit'), argnums=(0, 1, 2))(
      x, w, dy)
  _close(got, want)


def test_auto_is_explicit_on_cpu_and_names_are_checked():
  assert jax.default_backend() == 'cpu'
  assert conv.uses_explicit_gradients('auto')
  assert not conv.uses_explicit_gradients('lax')
  config = tiny_config()
  config.model.conv_gradients = 'fast'
  with pytest.raises(ValueError, match='model.conv_gradients: unknown'):
    build_learner(config)


def _loop_convolution_layouts(gradients):
  """dim_labels of every convolution XLA compiles for a two-step loop whose
  body takes the kernel gradients of a 3x3 and a 3x3 / 2 convolution."""
  x = jnp.ones((2, 8, 8, 3))
  kernels = (jnp.ones((3, 3, 3, 4)), jnp.ones((3, 3, 3, 4)))

  def loss(kernels, x):
    return sum(jnp.sum(jnp.sin(conv.conv2d(x, w, stride, 1, gradients)))
               for w, stride in zip(kernels, (1, 2)))

  def body(kernels, _):
    grads = jax.grad(loss)(kernels, x)
    return tuple(w - 0.1 * g for w, g in zip(kernels, grads)), None

  text = jax.jit(lambda k: jax.lax.scan(body, k, None, length=2)[0]).lower(
      kernels).compile().as_text()
  assert 'while' in text
  return [line.split('dim_labels=')[1].split(',')[0]
          for line in text.split('\n')
          if ' convolution(' in line and 'dim_labels=' in line]


def test_weight_gradients_keep_the_library_layout_inside_a_loop():
  """Inside a while loop's body XLA:CPU does not transpose a convolution's
  operands into its library's layout (JAX's weight gradient there ran tens
  of times slower); the explicit rules' convolutions are all in it."""
  canonical = 'b01f_01io->b01f'
  explicit = _loop_convolution_layouts('explicit')
  assert explicit and set(explicit) == {canonical}
  # JAX's own rules leave at least one there (what the test would see).
  assert set(_loop_convolution_layouts('lax')) != {canonical}


def _l2w_half_step(config):
  learner, state, images, labels = float64_step_setup(config)
  (xt, yt), (xm, ym) = forward.split_halves(images, labels)
  new_state, metrics = jax.jit(
      functools.partial(l2w.l2w_half_step, learner),
      static_argnames='with_meta')(state, xt, yt, xm, ym, 0.1, 1e-2,
                                   with_meta=True)
  return new_state.params, metrics['meta_grads'], new_state.batch_stats


def _uniform_half_step(config):
  learner, state, images, labels = float64_step_setup(config)
  new_state, _ = jax.jit(functools.partial(uniform.uniform_half_step,
                                           learner))(state, images, labels,
                                                     0.1)
  return new_state.params, new_state.batch_stats


# MSDNet runs the whole second-order meta step; RANet the cheaper
# first-order step (the meta step's second order is MSDNet's case), which
# still runs every one of its convolutions' rules.
@pytest.mark.parametrize('make_config,half_step', [
    (tiny_config, _l2w_half_step), (tiny_ranet_config, _uniform_half_step)])
def test_half_step_is_the_same_with_either_rules(float64, make_config,
                                                 half_step):
  """A whole half step on a backbone: explicit rules give JAX's parameters
  (meta-gradient) and statistics to float64 rounding."""
  del float64
  runs = {}
  for gradients in ('lax', 'explicit'):
    config = make_config()
    config.model.conv_gradients = gradients
    runs[gradients] = half_step(config)
  _close(runs['explicit'], runs['lax'], 1e-10)
