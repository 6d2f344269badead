"""Real early-exit inference against simulated exiting."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2w_jax.evaluation import anytime
from l2w_jax.evaluation.cascade import (Cascade, SingleImageCascade,
                                        bucket_sizes)
from l2w_jax.models.msdnet import MSDNet
from tests.tiny import (TINY_IMAGE, TINY_MSDNET,
                        assert_cascade_is_simulated_exiting)


@pytest.fixture(scope='session')
def trained_like():
  model = MSDNet(TINY_MSDNET)
  images = jax.random.normal(jax.random.PRNGKey(1), (90,) + TINY_IMAGE)
  variables = model.init(jax.random.PRNGKey(0), images[:1])
  stats = jax.jit(functools.partial(anytime.exit_statistics, model,
                                    variables))
  labels = jnp.zeros((90,), jnp.int32)
  held_out = stats(images[:50], labels[:50])
  test = stats(images[50:], labels[50:])
  return model, variables, np.asarray(images[50:]), held_out, test


def test_bucket_sizes():
  assert bucket_sizes(1) == (1,)
  assert bucket_sizes(20) == (1, 2, 4, 8, 16, 20)


@pytest.mark.parametrize('budget', [3, 20, 39])
def test_cascade_gives_the_simulated_predictions(trained_like, budget):
  model, variables, images, held_out, test = trained_like
  assert_cascade_is_simulated_exiting(model, variables, held_out, test,
                                      images, budget_index=budget, batch=16,
                                      single_stride=7)


def test_no_recompilation_after_warm_up(trained_like):
  model, variables, images, _, _ = trained_like
  cascade = Cascade(model, variables, np.full(model.num_exits, 0.5),
                    max_batch=8)
  cascade.warm_up(TINY_IMAGE)
  before = [s._cache_size() for s in cascade._stages]  # pylint: disable=protected-access
  for n in (8, 5, 1, 3):
    cascade.thresholds = np.random.default_rng(n).uniform(
        0.0, 1.0, model.num_exits).astype(np.float32)
    cascade(images[:n])
  assert [s._cache_size() for s in cascade._stages] == before  # pylint: disable=protected-access


def test_bad_thresholds_and_batches(trained_like):
  model, variables, images, _, _ = trained_like
  with pytest.raises(ValueError, match='thresholds'):
    Cascade(model, variables, [0.5, 0.5], max_batch=4)
  with pytest.raises(ValueError, match='thresholds'):
    SingleImageCascade(model, variables, [0.5])
  cascade = Cascade(model, variables, np.zeros(model.num_exits), max_batch=4)
  with pytest.raises(ValueError, match='exceeds max_batch'):
    cascade(images[:5])
