"""Per-exit FLOPs and parameters, counted by the original counter's rules.

The original (`models/op_counter.py` of L2W-DEN / MSDNet-PyTorch) hooks every
leaf layer during one forward pass of a single image and counts:
a convolution in*out*kh*kw*out_h*out_w (multiply-adds, groups 1); a ReLU the
elements of its input; a pooling layer out_h*out_w*channels*kernel^2 (with
out_h = out_w computed from the input height); a linear layer its weights and
biases; BatchNorm nothing. Parameters are those of the leaf layers met so
far. Each exit's figure is the running total when its linear layer runs, so
it includes every block and every classifier before it (a network with
other linear layers, IMTA's, names its exits' by `is_exit_layer(path)`).

Here the same rules are applied by intercepting the Flax leaf modules during
an abstract forward pass (`jax.eval_shape`): nothing is computed.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2w_jax.models.layers import (AvgPool2d, BatchNorm2d, Conv2d, Linear,
                                   MaxPool2d, ReLU)


def _pool_ops(x_shape, kernel: int, stride: int, padding: int) -> int:
  batch, height, _, channels = x_shape
  out = int((height + 2 * padding - kernel) / stride + 1)
  return batch * channels * out * out * kernel * kernel


def _leaf_counts(module: nn.Module, x_shape, y_shape) -> tuple[int, int]:
  """(ops, params) of one call of a leaf layer, or (0, 0) for containers."""
  if isinstance(module, Conv2d):
    k = module.kernel_size
    ops = module.in_features * module.features * k * k * y_shape[1] * y_shape[2]
    params = k * k * module.in_features * module.features
    return ops, params + (module.features if module.use_bias else 0)
  if isinstance(module, ReLU):
    return math.prod(x_shape), 0
  if isinstance(module, MaxPool2d):
    return _pool_ops(x_shape, module.kernel_size, module.stride,
                     module.padding), 0
  if isinstance(module, AvgPool2d):
    return _pool_ops(x_shape, module.kernel_size, module.kernel_size, 0), 0
  if isinstance(module, Linear):
    n = module.in_features * module.features + module.features
    return x_shape[0] * n, n
  if isinstance(module, BatchNorm2d):
    return 0, 2 * module.features
  return 0, 0


def count_per_exit(model: nn.Module, image_shape) -> tuple[list[float],
                                                            list[float]]:
  """Cumulative (FLOPs, params) at each exit for one image of (H, W, C)."""
  totals = {'ops': 0, 'params': 0}
  per_exit_ops, per_exit_params = [], []
  # A network with more linear layers than exits (IMTA's) names its exits'.
  is_exit_layer = getattr(type(model), 'is_exit_layer', None)

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and args:
      x = args[0]
      if hasattr(x, 'shape'):
        ops, params = _leaf_counts(context.module, x.shape,
                                   getattr(out, 'shape', None))
        totals['ops'] += ops
        totals['params'] += params
        if isinstance(context.module, Linear) and (
            is_exit_layer is None or is_exit_layer(context.module.path)):
          per_exit_ops.append(float(totals['ops']))
          per_exit_params.append(float(totals['params']))
    return out

  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)

  def forward(images):
    variables = model.init(jax.random.PRNGKey(0), images, train=False)
    with nn.intercept_methods(interceptor):
      return model.apply(variables, images, train=False)

  jax.eval_shape(forward, x)
  return per_exit_ops, per_exit_params
