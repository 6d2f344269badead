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
  assert bucket_sizes(20) == (1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20)
  assert bucket_sizes(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
  assert bucket_sizes(64, steps=4) == (1, 2, 4, 8, 16, 32, 48, 64)
  # Padding stays under an eighth of the batch (and under n itself).
  for n in range(1, 65):
    padded = next(b for b in bucket_sizes(64) if b >= n)
    assert padded - n < min(n, 8)


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
  programs = lambda: ([s._cache_size() for s in cascade._stages],  # pylint: disable=protected-access
                      cascade._gather._cache_size())  # pylint: disable=protected-access
  before = programs()
  for n in (8, 5, 1, 3):
    cascade.thresholds = np.random.default_rng(n).uniform(
        0.0, 1.0, model.num_exits).astype(np.float32)
    cascade(images[:n])
  assert programs() == before


def test_bad_thresholds_and_batches(trained_like):
  model, variables, images, _, _ = trained_like
  with pytest.raises(ValueError, match='thresholds'):
    Cascade(model, variables, [0.5, 0.5], max_batch=4)
  with pytest.raises(ValueError, match='thresholds'):
    SingleImageCascade(model, variables, [0.5])
  cascade = Cascade(model, variables, np.zeros(model.num_exits), max_batch=4)
  with pytest.raises(ValueError, match='exceeds max_batch'):
    cascade(images[:5])


def test_forced_exits_and_their_return_times(trained_like, tmp_path):
  """forced_exit_thresholds(K, k) sends every sample to exit k, in batches
  and one at a time; with the variables passed on each call instead of
  compiled in, both cascades predict the same; exit_return_times times each
  exit's return against the full network and restores the thresholds; the
  figure is drawn."""
  from l2w_jax.evaluation import cascade_timing  # pylint: disable=g-import-not-at-top
  from l2w_jax.evaluation import plots  # pylint: disable=g-import-not-at-top
  model, variables, images, held_out, _ = trained_like
  batched = Cascade(model, variables, np.full(model.num_exits, 0.5), 16)
  single = SingleImageCascade(model, variables, np.full(model.num_exits, 0.5))
  for k in range(model.num_exits):
    batched.thresholds = single.thresholds = (
        cascade_timing.forced_exit_thresholds(model.num_exits, k))
    assert batched(images[:16]).exits.tolist() == [k] * 16
    assert int(single(images[:1])[1]) == k
  # Half of the held-out samples are confident enough at each exit.
  batched.thresholds = np.quantile(np.asarray(held_out['confidence']), 0.5,
                                   axis=1).astype(np.float32)
  # The same with the variables passed on each call.
  passed = Cascade(model, variables, batched.thresholds, 16,
                   variables_as_constants=False)
  want, got = batched(images[:16]), passed(images[:16])
  assert len(set(want.exits.tolist())) > 1
  np.testing.assert_array_equal(got.predictions, want.predictions)
  np.testing.assert_array_equal(got.exits, want.exits)
  passed_single = SingleImageCascade(model, variables, batched.thresholds,
                                     variables_as_constants=False)
  for i in range(0, 16, 5):
    assert [int(v) for v in passed_single(images[i:i + 1])] == [
        want.predictions[i], want.exits[i]]
  full = jax.jit(lambda x: model.apply(variables, x, train=False))
  saved = np.array(batched.thresholds)
  exit_s, full_s = cascade_timing.exit_return_times(
      full, batched, [images[:16]], repeats=1)
  assert len(exit_s) == model.num_exits and min(exit_s) > 0 and full_s > 0
  np.testing.assert_array_equal(batched.thresholds, saved)

  class Recording:
    """The cascade, recording the exits of every call it is timed on."""
    model, seen = batched.model, []
    thresholds = property(lambda self: batched.thresholds)

    @thresholds.setter
    def thresholds(self, value):
      batched.thresholds = value

    def __call__(self, batch):
      exits = batched(batch).exits
      self.seen.append(set(exits.tolist()))
      return exits

  recording = Recording()
  cascade_timing.exit_return_times(full, recording, [images[:8], images[8:16]],
                                repeats=2)
  # An untimed pass and 2 repeats, of 2 batches, for each exit in turn.
  assert recording.seen == [{k} for _ in range(3)
                            for k in range(model.num_exits)
                            for _ in range(2)]
  np.testing.assert_array_equal(batched.thresholds, saved)
  path = tmp_path / 'exits.png'
  plots.plot_exit_return_times([1.0, 2.0, 3.0], [0.1, 0.2, 0.3], 0.3,
                               [0.05, 0.1, 0.2], 0.2, 16, str(path))
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  assert matplotlib.image.imread(path).shape[:2] == (576, 1536)
