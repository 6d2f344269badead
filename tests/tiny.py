"""Tiny models and configs shared by the tests."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import common
from l2w_jax import data
from l2w_jax import parallel
from l2w_jax.training import step as step_lib
from l2w_jax.training.checkpoint import Checkpointer
from l2w_jax.training.learner import build_learner, init_train_state
from l2w_jax.models.msdnet import MSDNetConfig
from l2w_jax.models.ranet import RANetConfig

# Two scales (16x16, 8x8) so that each classifier ends at 1x1.
TINY_MSDNET = MSDNetConfig(n_blocks=3, n_channels=4, growth_rate=2,
                           gr_factor=(1, 2), bn_factor=(1, 2),
                           step_mode='even', step=1, base=1, num_classes=5)
TINY_IMAGE = (16, 16, 3)
# Two flows on the same 16x16 images: 2 plain blocks at 8x8 (exits 0, 1),
# then at 16x16 two fusion blocks (the second downsampling) and one plain
# block (exit 2).
TINY_RANET = RANetConfig(n_blocks=2, block_step=1, scale_list=(1, 2),
                         gr_factor=(2, 1), bn_factor=(2, 1), n_channels=2,
                         growth_rate=4, step=2, num_classes=5)


def tiny_config(**meta) -> ml_collections.ConfigDict:
  """A full experiment config around TINY_MSDNET."""
  config = common.base_config()
  config.dataset.num_classes = TINY_MSDNET.num_classes
  config.dataset.image_size = TINY_IMAGE[0]
  for field in ('n_blocks', 'n_channels', 'growth_rate', 'gr_factor',
                'bn_factor', 'step_mode', 'step', 'base'):
    setattr(config.model, field, getattr(TINY_MSDNET, field))
  config.meta.hidden_size = 8
  config.train.lr = 0.1
  config.meta.lr = 1e-2
  for key, value in meta.items():
    setattr(config.meta, key, value)
  return config


def tiny_ranet_config(**meta) -> ml_collections.ConfigDict:
  """`tiny_config` with TINY_RANET as the backbone."""
  config = tiny_config(**meta)
  config.model.name = 'ranet'
  for field in ('n_blocks', 'block_step', 'scale_list', 'gr_factor',
                'bn_factor', 'n_channels', 'growth_rate', 'step', 'init'):
    setattr(config.model, field, getattr(TINY_RANET, field))
  return config


def tiny_train_config(dataset: str = 'sklearn_digits', num_steps: int = 3,
                      method: str = 'l2w') -> ml_collections.ConfigDict:
  """A whole experiment that trains a tiny MSDNet for a few iterations."""
  config = tiny_config()
  config.method = method
  config.dataset.name = dataset
  config.dataset.image_size = 16
  # MSDNet's protocol on 8 held-out images, as they are; full batches (one
  # program): the tests of the defaults set them back.
  config.eval.protocol = 'holdout'
  config.eval.threshold_augment = False
  config.dataset.holdout = 8
  config.train.last_batch = 'drop'
  config.dataset.augment = 'crop_flip'
  config.dataset.num_classes = {'sklearn_digits': 10, 'cifar10': 10,
                                'cifar100': 100, 'cifar100_lt': 100,
                                'imagenet2012': 1000}[dataset]
  if dataset == 'sklearn_digits':
    config.dataset.image_size = 32
    config.dataset.augment = 'crop'
    config.model.gr_factor = (1, 2, 4)
    config.model.bn_factor = (1, 2, 4)
  if dataset == 'cifar100_lt':
    config.dataset.imbalance_factor = 10
  if dataset == 'imagenet2012':
    # 64 px through the ImageNet stem (/4) leaves 16 and 8 px scales.
    config.dataset.image_size = 64
    config.dataset.augment = 'imagenet'
    config.model.stem = 'imagenet'
  config.train.batch_size = 8
  config.distributed.num_devices = 1  # tests of the sharded loop set more
  config.train.num_steps = num_steps
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 100
  config.train.eval_every_epochs = 0
  config.eval.batch_size = 16
  return config


def restore_state(config: ml_collections.ConfigDict, checkpoints, step=None):
  """The TrainState of `config`'s run saved at `step` (default: latest)
  under the directory `checkpoints`."""
  template = init_train_state(build_learner(config), jax.random.PRNGKey(0),
                              data.data_info(config).image_shape)
  checkpointer = Checkpointer(str(checkpoints))
  try:
    return checkpointer.restore(template, step)[0]
  finally:
    checkpointer.close()


def sharded_and_per_device(method: str, learner, state, per_device_step,
                           phase=None, num_devices: int = 8,
                           per_device: int = 4):
  """One whole-batch iteration of `method` sharded over `num_devices`
  simulated devices, and `per_device_step(state, images, labels)` on each
  device's shard alone, from the same `state` on the same float64 batch.
  Returns (sharded state, its metrics, [state after each device's step])."""
  n = num_devices * per_device
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(3),
                                        (n,) + TINY_IMAGE, jnp.float64))
  labels = np.arange(n, dtype=np.int32) % TINY_MSDNET.num_classes
  mesh = parallel.make_mesh(num_devices)
  iteration = step_lib.make_iteration(method, learner, mesh)
  sharded, (metrics,) = iteration(
      jax.device_put(jax.tree_util.tree_map(jnp.copy, state),
                     parallel.replicated(mesh)), images, labels, 0.3, 0.0,
      False, phase=phase)
  alone = [per_device_step(state, x, y)[0] for x, y in zip(
      np.split(images, num_devices), np.split(labels, num_devices),
      strict=True)]
  return sharded, metrics, alone


def mean_tree(trees):
  """The element-wise mean of trees of the same structure."""
  return jax.tree_util.tree_map(lambda *xs: sum(xs) / len(xs), *trees)


def float64_step_setup(config):
  """(learner, state, images (8, 16, 16, 3), labels (8,)) in float64 for
  `config` (a `tiny_config`); the state's SGD momentum is not zero, so that
  a step leaving it untouched is visible."""
  learner = build_learner(config)
  state = init_train_state(learner, jax.random.PRNGKey(0), TINY_IMAGE,
                           jnp.float64)
  state = state.replace(opt_state=learner.tx.update(
      jax.tree_util.tree_map(jnp.ones_like, state.params), state.opt_state,
      state.params)[1])
  images = jax.random.normal(jax.random.PRNGKey(1), (8,) + TINY_IMAGE,
                             jnp.float64)
  labels = jnp.arange(8, dtype=jnp.int32) % TINY_MSDNET.num_classes
  return learner, state, images, labels


def float64_meta_problem(config):
  """(learner, state, train half, meta half) in float64 for `config` (a
  `tiny_config`): 12 random TINY_IMAGE images with random labels of 5
  classes, split into halves of 6 by `forward.split_halves`."""
  from l2w_jax.training import forward  # pylint: disable=g-import-not-at-top
  learner = build_learner(config)
  state = init_train_state(learner, jax.random.PRNGKey(0), TINY_IMAGE,
                           dtype=jnp.float64)
  key_x, key_y = jax.random.split(jax.random.PRNGKey(1))
  images = jax.random.normal(key_x, (12,) + TINY_IMAGE, jnp.float64)
  labels = jax.random.randint(key_y, (12,), 0, 5)
  train_batch, meta_batch = forward.split_halves(images, labels)
  return learner, state, train_batch, meta_batch


def assert_cascade_is_simulated_exiting(model, variables, held_out, test,
                                        test_images, budget_index: int,
                                        batch: int,
                                        single_stride: int) -> np.ndarray:
  """Asserts that the real cascade, on `test_images` in batches of `batch`
  and one image at a time (every `single_stride`-th), gives simulated
  exiting's predictions and exits for the thresholds of budget
  `budget_index` (1..39) on `held_out`; returns the simulated exits.
  `held_out` and `test` are `anytime.exit_statistics` dicts."""
  from l2w_jax.evaluation import budgeted, cascade  # pylint: disable=g-import-not-at-top
  test_images = np.asarray(test_images)
  thresholds = budgeted.find_thresholds(
      np.asarray(held_out['confidence']),
      budgeted.budget_proportions(model.num_exits)[budget_index - 1])
  want_pred, want_exits = cascade.simulated_exits(
      np.asarray(test['confidence']), np.asarray(test['prediction']),
      thresholds)
  batched = cascade.Cascade(model, variables, thresholds, max_batch=16)
  outputs = [batched(test_images[i:i + batch])
             for i in range(0, len(test_images), batch)]
  np.testing.assert_array_equal(
      np.concatenate([o.predictions for o in outputs]), want_pred)
  np.testing.assert_array_equal(np.concatenate([o.exits for o in outputs]),
                                want_exits)
  # Later stages only saw the samples that had not exited.
  sizes = outputs[0].samples_per_stage
  assert sizes[0] == batch and sizes == sorted(sizes, reverse=True)
  # Each ran on the smallest bucket that holds them.
  assert outputs[0].rows_per_stage == [
      next(b for b in batched.buckets if b >= n) for n in sizes]
  single = cascade.SingleImageCascade(model, variables, thresholds)
  for i in range(0, len(test_images), single_stride):
    prediction, exit_index = single(test_images[i:i + 1])
    assert (int(prediction), int(exit_index)) == (want_pred[i],
                                                  want_exits[i])
  return want_exits


def check_cascade_against_simulated(model) -> np.ndarray:
  """Runs `model` (random weights, 60 random TINY_IMAGE images: 30 held
  out for the budget-20 thresholds, 30 tested) through the real cascade in
  batches of 15 and one image at a time, asserting both give simulated
  exiting's predictions and exits; returns the 30 exits."""
  from l2w_jax.evaluation import anytime  # pylint: disable=g-import-not-at-top
  images = jax.random.normal(jax.random.PRNGKey(1), (60,) + TINY_IMAGE)
  labels = jnp.zeros((60,), jnp.int32)
  variables = model.init(jax.random.PRNGKey(0), images[:1])
  stats = jax.jit(lambda x, y: anytime.exit_statistics(model, variables, x,
                                                       y))
  held_out, test = stats(images[:30], labels[:30]), stats(images[30:],
                                                           labels[30:])
  return assert_cascade_is_simulated_exiting(
      model, variables, held_out, test, images[30:], budget_index=20,
      batch=15, single_stride=4)


def checkpointing_digits_config(tmp_path, num_steps: int = 4):
  """`tiny_train_config` on digits prepared under `tmp_path`/data, saving a
  checkpoint every iteration and keeping the last five (the fault tests)."""
  config = tiny_train_config('sklearn_digits', num_steps=num_steps)
  config.dataset.data_dir = str(tmp_path / 'data')
  config.train.checkpoint_every_steps = 1
  config.train.keep_checkpoints = 5
  return config
