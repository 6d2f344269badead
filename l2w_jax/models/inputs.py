"""The network's input on the device from a batch as it crossed the
host-device link (uint8 pixels, normalised here)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def model_input(images: jax.Array, mean: Sequence[float] | None,
                std: Sequence[float] | None) -> jax.Array:
  """The network's input from a batch as it crossed the link.

  Args:
    images: (B, H, W, C) uint8 pixels, or floats already normalised.
    mean: (C,) per-channel mean of x / 255 (needed for uint8 input).
    std: (C,) per-channel standard deviation of x / 255.

  Returns:
    (B, H, W, C) float32 (x / 255 - mean) / std for uint8 input, computed
    in that order in float32 as the input pipeline (torchvision's ToTensor
    + Normalize) does, so the values are the pipeline's to the bit; other
    dtypes unchanged.
  """
  if images.dtype != jnp.uint8:
    return images
  if mean is None or std is None:
    raise ValueError('uint8 images need the dataset\'s mean and std '
                     '(make_iteration(..., input_norm=(mean, std)))')
  x = images.astype(jnp.float32)
  # XLA turns a division by a broadcast value into a multiplication by its
  # reciprocal (1 ulp off the pipeline's division for half of the bytes);
  # an elementwise divisor keeps the division. x * 0 cannot be folded away
  # (inf * 0 is NaN), so the divisors stay elementwise.
  zero = x * 0
  x = x / (jnp.float32(255.0) + zero)
  return ((x - jnp.asarray(mean, jnp.float32)) /
          (jnp.asarray(std, jnp.float32) + zero))
