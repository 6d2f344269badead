"""The kind of each operation of a compiled XLA module, read from its text:
what benchmarks.op_profile sums a profile's times by."""

import re

_INSTRUCTION = re.compile(
    r'\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([a-z\-]+)\(')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%([\w.\-]+) .*\{$')
_ORDER = ('convolution', 'dot', 'reduce', 'concatenate', 'transpose')


def operation_kinds(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (kind, 'shape')} of a compiled module's text: a
  fusion's kind is that of the first of _ORDER among its instructions,
  else 'elementwise'."""
  bodies, current = {}, None
  for line in hlo_text.split('\n'):
    match = _COMPUTATION.match(line)
    if match:
      current = bodies.setdefault(match.group(1), [])
    elif current is not None:
      current.append(line)
  kinds = {}
  for line in hlo_text.split('\n'):
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    called = re.search(r'calls=%([\w.\-]+)', line)
    ops = {match.group(3)}
    if called:
      ops |= {m.group(3) for m in map(_INSTRUCTION.match,
                                      bodies.get(called.group(1), [])) if m}
    kind = next((k for k in _ORDER if k in ops), 'elementwise')
    kinds[match.group(1)] = (kind, match.group(2))
  return kinds
