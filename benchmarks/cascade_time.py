r"""Real early exiting against the full network on a full-size backbone.

  python -m benchmarks.cascade_time --config=configs/cifar100.py

The demo model is so small that per-stage dispatch dominates its cascade;
this times the paper's CIFAR-100 MSDNet (random weights, random images: the
thresholds are quantiles of the held-out confidences, so each budget still
sends the intended fractions of samples to each exit). Prints one JSON line:
for each budget the FLOPs-predicted speed-up and the measured ones, in
batches and one image at a time, and the time per image at which each exit
returns when every image leaves there (`exit_return_ms`); `--figure` draws
those return times against the full network's.
"""

import functools
import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from configs import common

from l2w_jax.evaluation import anytime, budgeted
from l2w_jax.evaluation import plots
from l2w_jax.evaluation.cascade import Cascade, SingleImageCascade
from l2w_jax.evaluation.cascade_timing import (compare_with_full_network,
                                               exit_return_times)
from l2w_jax.evaluation.flops import count_per_exit
from l2w_jax.models import build_model

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar100.py')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Cascade batch size.')
_IMAGES = flags.DEFINE_integer('images', 512, 'Test images (and as many '
                               'held-out ones).')
_SINGLE = flags.DEFINE_integer('latency_images', 128, 'Images timed one by '
                               'one.')
_BUDGETS = flags.DEFINE_list(
    'budgets', ['1', '5', '10', '15', '20', '25', '30', '35', '39'],
    'Budget indices (1..39).')
_FIGURE = flags.DEFINE_string('figure', None, 'Where to draw each exit\'s '
                              'return time (PNG or PDF); none by default.')


def main(argv):
  del argv
  config = common.config_from_flag(_CONFIG)
  model = build_model(config)
  size = config.dataset.image_size
  shape = (size, size, 3)
  n = _IMAGES.value
  images = jax.random.normal(jax.random.PRNGKey(1), (2 * n,) + shape)
  variables = model.init(jax.random.PRNGKey(0), images[:1])
  stats = jax.jit(functools.partial(anytime.exit_statistics, model,
                                    variables))
  labels = jnp.zeros((_BATCH.value,), jnp.int32)
  confidence = np.concatenate([
      np.asarray(stats(images[i:i + _BATCH.value], labels)['confidence'])
      for i in range(0, n, _BATCH.value)], axis=1)
  test = np.asarray(images[n:])
  batches = [test[i:i + _BATCH.value] for i in range(0, n, _BATCH.value)]
  singles = [test[i:i + 1] for i in range(_SINGLE.value)]
  flops = np.asarray(count_per_exit(model, shape)[0])

  full = jax.jit(lambda x: model.apply(variables, x, train=False))
  jax.block_until_ready(full(batches[0]))
  jax.block_until_ready(full(singles[0]))
  cascade = Cascade(model, variables, np.zeros(model.num_exits), _BATCH.value)
  cascade.warm_up(shape)
  single = SingleImageCascade(model, variables, np.zeros(model.num_exits))
  jax.block_until_ready(single(singles[0]))

  rows = []
  for index in (int(b) for b in _BUDGETS.value):
    proportions = budgeted.budget_proportions(model.num_exits)[index - 1]
    thresholds = budgeted.find_thresholds(confidence, proportions)
    cascade.thresholds = single.thresholds = thresholds
    exits = np.concatenate([cascade(b).exits for b in batches])
    fractions = np.bincount(exits, minlength=model.num_exits) / len(exits)
    expected = float(np.sum(fractions * flops))
    t = compare_with_full_network(full, cascade, single, batches, singles)
    rows.append({
        'budget_index': index,
        'flops_speedup': round(float(flops[-1] / expected), 3),
        'batch_speedup': round(t['batch_speedup'], 3),
        'single_speedup': round(t['single_speedup'], 3),
        **{k[:-len('_s')] + '_ms': round(1e3 * v, 3) for k, v in t.items()
           if k.endswith('_s')}})
  returns = {}
  returns['single'], returns['full_single'] = exit_return_times(
      full, single, singles)
  returns['batch'], returns['full_batch'] = exit_return_times(
      full, cascade, batches)
  returns = {k: np.round(1e3 * np.asarray(v), 3).tolist()
             for k, v in returns.items()}
  if _FIGURE.value:
    plots.plot_exit_return_times(
        flops / 1e6, returns['single'], returns['full_single'],
        returns['batch'], returns['full_batch'], _BATCH.value, _FIGURE.value,
        title=f'{config.dataset.name} {config.model.name}, CPU: time until '
        'each exit returns')
  lowest = min(rows, key=lambda r: r['budget_index'])
  print(json.dumps({'model': config.model.name,
                    'mflops_per_exit': [round(f / 1e6, 3) for f in flops],
                    'batch_size': _BATCH.value, 'budgets': rows,
                    'min_batch_speedup': min(r['batch_speedup'] for r in rows),
                    'min_single_speedup': min(r['single_speedup']
                                              for r in rows),
                    # Of the lowest budget: measured / FLOPs-predicted.
                    'lowest_budget_batch_fraction': round(
                        lowest['batch_speedup'] / lowest['flops_speedup'], 3),
                    'exit_return_ms': returns}))


if __name__ == '__main__':
  app.run(main)
