r"""Times the 39-budget evaluation on synthetic softmax outputs.

  python -m benchmarks.budgeted_eval --n_val=50000 --n_test=50000 --exits=5 --classes=100

Prints one JSON line: {"seconds": ...} (median of --repeats runs of
`budgeted_evaluation_from_probs`: validation of the inputs, max/argmax over
classes, threshold search on the held-out set and application to the test
set, for all 39 budgets). The original's per-sample Python loops take about
110 s at this size on the same machine (22 s for 10,000 + 10,000).
"""

import json
import statistics
import time

from absl import app
from absl import flags
import numpy as np

from l2w_jax.evaluation.budgeted import budgeted_evaluation_from_probs

_N_VAL = flags.DEFINE_integer('n_val', 50000, 'Held-out samples.')
_N_TEST = flags.DEFINE_integer('n_test', 50000, 'Test samples.')
_EXITS = flags.DEFINE_integer('exits', 5, 'Exits.')
_CLASSES = flags.DEFINE_integer('classes', 100, 'Classes.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs.')


def synthetic_outputs(rng, exits, n, classes):
  """Softmax outputs that get more confident and more accurate by exit."""
  labels = rng.integers(0, classes, size=n)
  probs = np.empty((exits, n, classes), np.float32)
  for k in range(exits):
    logits = rng.normal(size=(n, classes)).astype(np.float32)
    logits[np.arange(n), labels] += 1.0 + k
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    probs[k] = e / e.sum(axis=1, keepdims=True)
  return probs, labels


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  val, val_labels = synthetic_outputs(rng, _EXITS.value, _N_VAL.value,
                                      _CLASSES.value)
  test, test_labels = synthetic_outputs(rng, _EXITS.value, _N_TEST.value,
                                        _CLASSES.value)
  flops = np.cumsum(rng.uniform(1e6, 2e6, size=_EXITS.value))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    budgeted_evaluation_from_probs(val, val_labels, test, test_labels, flops)
    times.append(time.perf_counter() - start)
  print(json.dumps({'seconds': round(statistics.median(times), 4),
                    'n_val': _N_VAL.value, 'n_test': _N_TEST.value,
                    'exits': _EXITS.value, 'classes': _CLASSES.value}))


if __name__ == '__main__':
  app.run(main)
