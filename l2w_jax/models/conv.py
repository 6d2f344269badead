"""2-D convolution with gradients chosen for XLA:CPU, closed under
differentiation.

A convolution y = conv(x, w) has two derivatives, the input gradient
dx = input_grad(dy, w) and the weight gradient dw = weight_grad(x, dy).
JAX's own rules give both as `lax.conv_general_dilated` calls in layouts
that XLA:CPU runs slowly on the small feature maps of MSDNet and RANet:

- the input gradient of a strided convolution is an lhs-dilated
  convolution, which XLA:CPU's fast convolution library does not take;
  here it is a stride-1 convolution of the cotangent spread out with zeros
  (`lax.pad` with interior padding) by the flipped kernel;
- the weight gradient of a 1x1 convolution is a convolution over the batch
  that XLA:CPU runs after transposing both operands; here it is one matrix
  product, (N*H*W, C_in)^T (N*H*W, C_out);
- the other weight gradients are that convolution over the batch with the
  transpositions written out: XLA:CPU inserts them itself in a program's
  entry computation, but not inside a while loop's body, where the
  untransposed convolution ran tens of times slower (with these rules the
  training loop's scan over the two halves stays a loop on CPU too;
  `training.step.unroll_halves`).

The three are bilinear forms of one trilinear form <conv(x, w), dy>, so
each one's derivatives are the other two (`_rules`): the second-order graph
of L2W's meta step (the gradient of a loss through a virtual SGD step)
runs on the same fast forms. Values differ from JAX's rules by float32
rounding only (the same products, summed in another order).

Reverse mode only: `jax.jvp` through these raises (custom VJPs); use
`model.conv_gradients='lax'` for forward mode. The same field selects
BatchNorm's one-pass derivative (`models/batch_norm.py`).
`conv2d(..., gradients='auto')` uses these rules on CPU and JAX's
elsewhere (cuDNN and the TPU compiler take every layout).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

GRADIENTS = ('auto', 'explicit', 'lax')
_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def _forward(x, w, stride: int, padding: int):
  return lax.conv_general_dilated(
      x, w, (stride, stride), ((padding, padding), (padding, padding)),
      dimension_numbers=_DIMENSIONS)


def _input_grad(dy, w, stride: int, padding: int, in_hw: tuple[int, int]):
  """d<conv(x, w), dy>/dx: (B, H', W', O) -> (B, H, W, I), H, W = in_hw."""
  k = w.shape[0]
  if stride > 1:  # zeros between the cotangent's rows and columns
    zero = jnp.zeros((), dy.dtype)
    gap = stride - 1
    dy = lax.pad(dy, zero, ((0, 0, 0), (0, 0, gap), (0, 0, gap), (0, 0, 0)))
  low = k - 1 - padding
  # The high side also covers the rows the forward's stride never reached.
  pads = [(low, size - (dy.shape[1 + d] + low - k + 1))
          for d, size in enumerate(in_hw)]
  flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  return lax.conv_general_dilated(dy, flipped, (1, 1), pads,
                                  dimension_numbers=_DIMENSIONS)


def _weight_grad(x, dy, stride: int, padding: int, k: int):
  """d<conv(x, w), dy>/dw: x (B, H, W, I), dy (B, H', W', O) -> (k, k, I, O)."""
  if k == 1 and stride == 1 and padding == 0:
    g = lax.dot_general(x.reshape(-1, x.shape[-1]),
                        dy.reshape(-1, dy.shape[-1]),
                        (((0,), (0,)), ((), ())))
    return g.reshape(1, 1, x.shape[-1], dy.shape[-1])
  # A convolution over the batch, as JAX's rule, but with the operands
  # transposed here into the layouts XLA:CPU's library takes (x as
  # (I, H, W, B) images of B channels, dy as a (H', W', B, O) kernel
  # dilated by the stride). Inside a while loop's body XLA does not
  # transpose them itself, and the convolution ran tens of times slower.
  pads = [(padding, k - size - padding + stride * (out - 1))
          for size, out in zip(x.shape[1:3], dy.shape[1:3])]
  g = lax.conv_general_dilated(
      jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)),
      (1, 1), pads, rhs_dilation=(stride, stride),
      dimension_numbers=_DIMENSIONS)  # (I, k, k, O)
  return jnp.transpose(g, (1, 2, 0, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, stride, padding):
  return _forward(x, w, stride, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_input_grad(dy, w, stride, padding, in_hw):
  return _input_grad(dy, w, stride, padding, in_hw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_weight_grad(x, dy, stride, padding, k):
  return _weight_grad(x, dy, stride, padding, k)


def _rules():
  """Each form's VJP in terms of the three forms (T = <conv(x, w), dy>)."""
  def conv_fwd(x, w, stride, padding):
    return _conv(x, w, stride, padding), (x, w)

  def conv_bwd(stride, padding, res, g):
    x, w = res
    return (_conv_input_grad(g, w, stride, padding, x.shape[1:3]),
            _conv_weight_grad(x, g, stride, padding, w.shape[0]))

  def input_grad_fwd(dy, w, stride, padding, in_hw):
    return _conv_input_grad(dy, w, stride, padding, in_hw), (dy, w)

  def input_grad_bwd(stride, padding, in_hw, res, g):
    dy, w = res  # g has x's shape
    return (_conv(g, w, stride, padding),
            _conv_weight_grad(g, dy, stride, padding, w.shape[0]))

  def weight_grad_fwd(x, dy, stride, padding, k):
    return _conv_weight_grad(x, dy, stride, padding, k), (x, dy)

  def weight_grad_bwd(stride, padding, k, res, g):
    x, dy = res  # g has w's shape
    return (_conv_input_grad(dy, g, stride, padding, x.shape[1:3]),
            _conv(x, g, stride, padding))

  _conv.defvjp(conv_fwd, conv_bwd)
  _conv_input_grad.defvjp(input_grad_fwd, input_grad_bwd)
  _conv_weight_grad.defvjp(weight_grad_fwd, weight_grad_bwd)


_rules()


def check_gradients(name: str) -> str:
  """`name` if it is one of GRADIENTS, else ValueError naming the field."""
  if name not in GRADIENTS:
    raise ValueError(f'model.conv_gradients: unknown {name!r}; use one of '
                     f'{", ".join(GRADIENTS)}')
  return name


def uses_explicit_gradients(gradients: str) -> bool:
  """Whether `gradients` ('auto', 'explicit' or 'lax') means this module's
  rules on the default backend ('auto': on CPU only)."""
  check_gradients(gradients)
  if gradients == 'auto':
    return jax.default_backend() == 'cpu'
  return gradients == 'explicit'


def conv2d(x: jax.Array, w: jax.Array, stride: int = 1, padding: int = 0,
           gradients: str = 'auto') -> jax.Array:
  """`torch.nn.functional.conv2d` without bias on NHWC inputs.

  Args:
    x: (B, H, W, I) inputs.
    w: (k, k, I, O) kernel (HWIO), square.
    stride: the same along both spatial axes.
    padding: zeros on every side (symmetric, as PyTorch pads).
    gradients: 'explicit' for this module's derivative rules, 'lax' for
      JAX's own, 'auto' for 'explicit' on CPU and 'lax' elsewhere.

  Returns:
    (B, H', W', O), H' = (H + 2 padding - k) // stride + 1.
  """
  if uses_explicit_gradients(gradients):
    return _conv(x, w, int(stride), int(padding))
  return _forward(x, w, stride, padding)
