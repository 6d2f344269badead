"""benchmarks.op_profile's reading of a compiled module: each operation's
kind, fusions by what they contain."""

import jax
import jax.numpy as jnp

from benchmarks import op_profile


def test_operations_are_classified_by_what_they_compute():
  def f(x, w, m):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO',
                                                        'NHWC'))
    return jnp.sum(y, axis=(1, 2)) @ m, jnp.exp(m) + 1.0

  args = (jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4)), jnp.ones((4, 5)))
  text = jax.jit(f).lower(*args).compile().as_text()
  kinds = {kind for kind, _ in op_profile.operation_kinds(text).values()}
  assert {'convolution', 'dot', 'elementwise'} <= kinds
  shapes = [shape for kind, shape in op_profile.operation_kinds(text).values()
            if kind == 'dot']
  assert any(s.startswith('f32[2,5]') for s in shapes)
