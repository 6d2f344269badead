"""benchmarks.hlo_kinds: each operation of a compiled module gets a kind,
a fusion the kind of what it contains."""

import jax
import jax.numpy as jnp

from benchmarks import hlo_kinds


def test_operations_are_classified_by_what_they_compute():
  def f(x, w, m):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO',
                                                        'NHWC'))
    # The tanh makes the sum a fusion, whose kind is read from its body.
    return jnp.sum(jnp.tanh(y), axis=(1, 2)) @ m, jnp.exp(m) + 1.0

  args = (jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4)), jnp.ones((4, 5)))
  text = jax.jit(f).lower(*args).compile().as_text()
  operations = hlo_kinds.operation_kinds(text)
  assert {'convolution', 'dot', 'reduce', 'elementwise'} <= {
      kind for kind, _ in operations.values()}
  fusions = {operations[line.split('=')[0].strip().lstrip('%')][0]
             for line in text.split('\n') if ' fusion(' in line}
  assert fusions == {'reduce', 'elementwise'}
  assert any(shape.startswith('f32[2,5]')
             for kind, shape in operations.values() if kind == 'dot')
