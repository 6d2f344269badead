"""The problem the step benchmarks (`step_time`, `op_profile`) time."""

import jax

from l2w_jax.training.learner import build_learner, init_train_state


def timing_problem(config, batch_size: int):
  """What the step benchmarks time: (learner, state, images (B, H, W, 3),
  labels (B,)) of `config`'s backbone with L2W-DEN's learner (it runs the
  plain step too, whatever the config's method), random images and labels."""
  config.method = 'l2w'
  learner = build_learner(config)
  size = config.dataset.image_size
  state = init_train_state(learner, jax.random.PRNGKey(0), (size, size, 3))
  key_x, key_y = jax.random.split(jax.random.PRNGKey(1))
  images = jax.random.normal(key_x, (batch_size, size, size, 3))
  labels = jax.random.randint(key_y, (batch_size,), 0,
                              config.dataset.num_classes)
  return learner, state, images, labels
