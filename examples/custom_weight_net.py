r"""A new weight network and a new meta objective in a few lines, trained
on the embedded digits with the project's meta-gradient.

  python examples/custom_weight_net.py --steps=150

The weight net reads each exit's confidence and a learned embedding of the
exit (L2W-DEN's reads the per-exit losses); the meta objective is the mean
cross-entropy over every exit on the meta half (L2W-DEN's allocates each
meta sample to one exit by confidence); both are defined in
`examples/confidence_weight_net.py`, which also registers them so that
`experiments.main` trains them from the config. This file is the API path:
a loop of its own around `l2w_jax.meta.api.meta_gradient`. The backbone (the digits MSDNet),
the optimizers, the data and the differentiation through the virtual step
(`l2w_jax.meta.api.meta_gradient`) are the project's. Prints one JSON line:
test top-1 per exit, the last meta loss and the mean weight per exit.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import digits  # pylint: disable=g-import-not-at-top,wrong-import-position
from examples.confidence_weight_net import (  # pylint: disable=g-import-not-at-top,wrong-import-position
    ConfidenceExitNet, confidence_weights, mean_exit_loss)
from l2w_jax import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from l2w_jax.meta import api, weighting  # pylint: disable=g-import-not-at-top,wrong-import-position
from l2w_jax.models import build_model  # pylint: disable=g-import-not-at-top,wrong-import-position
from l2w_jax.optim import apply_optimizer, torch_adam, torch_sgd  # pylint: disable=g-import-not-at-top,wrong-import-position
from l2w_jax.models.inputs import model_input  # pylint: disable=g-import-not-at-top,wrong-import-position

_STEPS = flags.DEFINE_integer('steps', 150, 'Training iterations.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'tfds data_dir (default: '
                                'tfds\'s).')


def make_half_step(model, weight_net, tx, meta_tx):
  """One half of an iteration: the meta step through the virtual step, then
  the real step with the updated weight net's weights."""

  weight_fn = confidence_weights(weight_net)

  def half_step(state, train_batch, meta_batch, lr, meta_lr):
    params, stats, opt, meta_params, meta_opt = state
    (meta_loss, _), meta_grads = api.meta_gradient(
        meta_params, params=params, opt_state=opt,
        losses_fn=api.backbone_loss_fn(model, stats), weight_fn=weight_fn,
        objective_fn=mean_exit_loss, optimizer=tx, train_batch=train_batch,
        meta_batch=meta_batch, learning_rate=lr)
    meta_params, meta_opt = apply_optimizer(meta_tx, meta_grads, meta_opt,
                                            meta_params, meta_lr)

    def weighted(p):
      logits, moved = model.apply({'params': p, 'batch_stats': stats},
                                  train_batch[0], train=True,
                                  mutable=['batch_stats'])
      losses = weighting.per_exit_losses(logits, train_batch[1])
      weights = jax.lax.stop_gradient(weight_fn(meta_params, losses, logits))
      return jnp.sum(jnp.mean(weights * losses, axis=0)), (moved, weights)

    (_, (moved, weights)), grads = jax.value_and_grad(weighted, has_aux=True)(
        params)
    params, opt = apply_optimizer(tx, grads, opt, params, lr)
    return ((params, moved['batch_stats'], opt, meta_params, meta_opt),
            meta_loss, jnp.mean(weights, axis=0))

  return jax.jit(half_step)


def train(steps: int, data_dir: str | None = None) -> dict:
  """Trains the digits MSDNet for `steps` iterations; the JSON summary."""
  config = digits.get_config()
  config.dataset.data_dir = data_dir
  model = build_model(config)
  weight_net = ConfidenceExitNet(model.num_exits)
  tx = torch_sgd(config.train.lr, config.train.momentum,
                 config.train.weight_decay)
  meta_tx = torch_adam(config.meta.lr, config.meta.weight_decay)
  info = data.data_info(config)
  spec = data.input_spec(config)
  variables = model.init(jax.random.PRNGKey(0),
                         jnp.zeros((1,) + info.image_shape))
  meta_params = weight_net.init(jax.random.PRNGKey(1), jnp.zeros(
      (1, model.num_exits)))['params']
  state = (variables['params'], variables['batch_stats'],
           tx.init(variables['params']), meta_params,
           meta_tx.init(meta_params))
  half_step = make_half_step(model, weight_net, tx, meta_tx)
  per_epoch = data.steps_per_epoch(info, config.train.batch_size,
                                   config.train.last_batch)
  step, meta_loss, mean_weights = 0, None, None
  while step < steps:
    for batch in data.train_batches(config, epoch=step // per_epoch,
                                    start_step=step % per_epoch):
      lr = 0.5 * config.train.lr * (1 + np.cos(np.pi * step / steps))
      # Training batches arrive as uint8; the network takes them normalised.
      images = model_input(batch['image'], spec.mean, spec.std)
      half = images.shape[0] // 2
      p1 = (images[:half], batch['label'][:half])
      p2 = (images[half:], batch['label'][half:])
      for train_half, meta_half in ((p1, p2), (p2, p1)):
        state, meta_loss, mean_weights = half_step(
            state, train_half, meta_half, lr, config.meta.lr)
      step += 1
      if step >= steps:
        break
  hits, count = np.zeros(model.num_exits), 0
  for batch in data.eval_batches(config, 'test', 180):
    logits = model.apply({'params': state[0], 'batch_stats': state[1]},
                         batch['image'], train=False)
    mask = batch['mask']
    hits += [np.sum((np.argmax(z, -1) == batch['label']) & mask)
             for z in logits]
    count += int(mask.sum())
  return {'steps': steps,
          'test_top1_per_exit': [round(100 * h / count, 2) for h in hits],
          'meta_loss': float(meta_loss),
          'mean_weight_per_exit': [round(float(w), 4) for w in mean_weights]}


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.ERROR)  # tfds's INFO lines
  print(json.dumps(train(_STEPS.value, _DATA_DIR.value)), flush=True)


if __name__ == '__main__':
  app.run(main)
