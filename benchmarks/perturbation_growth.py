r"""How far two runs part when their parameters start one rounding apart.

  python -m benchmarks.perturbation_growth --config=configs/digits.py \
      --steps=6 --epsilon=1e-7

Trains `--steps` iterations of the config's method twice on the same batches
(the training pipeline's first batches, the cosine schedule over `--steps`),
once from the initial state and once with every parameter scaled by
(1 +- epsilon), random signs. Prints one JSON line with the largest
parameter difference after each iteration. Runs on different device or
process layouts sum their all-reduces in different orders, so they start
parting at this scale: this bounds how closely their whole trajectories can
agree.
"""

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from configs import common

from l2w_jax import data
from l2w_jax import parallel
from l2w_jax.training import step as step_lib
from l2w_jax.training.learner import build_learner, init_train_state
from l2w_jax.training.schedules import cosine_learning_rate

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/digits.py')
_STEPS = flags.DEFINE_integer('steps', 6, 'Iterations to train.')
_EPSILON = flags.DEFINE_float('epsilon', 1e-7, 'Relative perturbation.')


def scaled(tree, epsilon: float, key: jax.Array):
  """Every leaf times (1 + epsilon * s), s = +-1 drawn per element."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [
      x * (1 + epsilon * jax.random.rademacher(k, x.shape, x.dtype))
      for x, k in zip(leaves, keys, strict=True)])


def max_difference(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree_util.tree_leaves(a),
                             jax.tree_util.tree_leaves(b), strict=True))


def main(argv):
  del argv
  config = common.config_from_flag(_CONFIG)
  config.distributed.num_devices = config.distributed.num_devices or 1
  info = data.data_info(config)
  mesh = parallel.make_mesh(config.distributed.num_devices)
  learner = build_learner(config)
  spec = data.input_spec(config)
  iteration = step_lib.make_iteration(config.method, learner, mesh,
                                      config.train.bn_stats,
                                      input_norm=(spec.mean, spec.std))
  initial = init_train_state(learner, jax.random.PRNGKey(config.seed),
                             info.image_shape)
  runs = [initial, initial.replace(params=scaled(
      initial.params, _EPSILON.value, jax.random.PRNGKey(1)))]
  runs = [jax.device_put(jax.tree_util.tree_map(jnp.copy, s),
                         parallel.replicated(mesh)) for s in runs]
  growth = []
  batches = data.train_batches(config, epoch=0)
  for step, batch in zip(range(_STEPS.value), batches):
    lr = cosine_learning_rate(config.train.lr, step, _STEPS.value)
    meta_lr = cosine_learning_rate(config.meta.lr, step, _STEPS.value)
    runs = [iteration(s, batch['image'], batch['label'], lr, meta_lr,
                      step % config.meta.interval == 0)[0] for s in runs]
    growth.append(float(f'{max_difference(*(s.params for s in runs)):.3g}'))
  print(json.dumps({'method': config.method, 'dataset': info.name,
                    'epsilon': _EPSILON.value,
                    'batch_size': config.train.batch_size,
                    'lr': config.train.lr, 'devices': mesh.size,
                    'max_param_difference_per_step': growth}))


if __name__ == '__main__':
  app.run(main)
