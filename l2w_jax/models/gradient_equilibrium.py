"""Gradient equilibrium (IMTA, Li et al. 2019; also BoostNet's backbone).

An identity whose backward pass multiplies the gradient by a constant. The
original (`GradientRescaleFunction` in IMTA's `msdnet_ge.py`) applies it twice
to the coarsest-scale feature after block i of K (0-based): once with
1/(K-i) before the classifier reads it, and once more, on the already
rescaled tensor, with (K-i-1) before the next block reads it. The gradient
reaching block i's coarsest output is therefore
(g_classifier + (K-i-1) g_later) / (K-i); finer scales are not rescaled, and
the classifier's own parameters get their plain gradient.

A `custom_vjp` keeps the forward bit-identical to the input, which a
`s*x + stop_gradient((1-s)*x)` formulation would not.
"""

from __future__ import annotations

import functools

import jax


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_gradient(x: jax.Array, scale: float) -> jax.Array:
  """x unchanged; its cotangent is multiplied by the Python float `scale`."""
  del scale
  return x


def _forward(x, scale):
  del scale
  return x, None


def _backward(scale, _, g):
  # A Python float times the cotangent: the same rounding as torch's
  # `weight * grad_output` in the cotangent's own dtype.
  return (g * scale,)


scale_gradient.defvjp(_forward, _backward)


def classifier_scale(block: int, num_blocks: int) -> float:
  """Backward scale on block `block`'s coarsest feature into its classifier."""
  return 1.0 / (num_blocks - block)


def onward_scale(block: int, num_blocks: int) -> float:
  """Backward scale applied next, on the way to the later blocks."""
  return float(num_blocks - block - 1)
