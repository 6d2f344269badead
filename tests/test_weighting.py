"""Weights, centring, target proportions and the meta allocation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2w_jax.meta import weighting


def allocate_like_the_original(confidences, probs):
  """The original's loop, stated plainly (python lists, stable sort)."""
  n, num_exits = confidences.shape
  used, assignment = [], [None] * n
  for k in range(num_exits):
    order = sorted(range(n), key=lambda i: -confidences[i, k])  # stable
    if k == 0:
      chosen = order[:math.floor(np.float32(n) * np.float32(probs[k]))]
    elif k < num_exits - 1:
      free = [i for i in order if i not in set(used)]
      chosen = free[:math.floor(np.float32(n) * np.float32(probs[k]))]
    else:
      chosen = [i for i in order if i not in set(used)]
    used.extend(chosen)
    for i in chosen:
      assignment[i] = k
  return np.array(assignment)


@pytest.mark.parametrize('n,num_exits,p_index,seed', [
    (8, 5, 15, 0), (32, 5, 15, 1), (31, 3, 5, 2), (64, 7, 30, 3),
    (10, 2, 20, 4), (5, 5, 1, 5), (40, 4, 39, 6)])
def test_allocation_matches_plain_python_rule(n, num_exits, p_index, seed):
  rng = np.random.default_rng(seed)
  conf = rng.uniform(0.01, 1.0, size=(n, num_exits)).astype(np.float32)
  conf[: n // 4] = conf[0]  # exact ties across samples
  probs = weighting.target_probs(num_exits, p_index)
  got = weighting.allocate_to_exits(
      jnp.asarray(conf), weighting.exit_quotas(n, probs))
  want = allocate_like_the_original(conf, probs)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_allocation_is_jittable_and_counts_are_quotas():
  conf = jax.random.uniform(jax.random.PRNGKey(0), (100, 5))
  quotas = weighting.exit_quotas(100, weighting.target_probs(5, 15))
  got = jax.jit(weighting.allocate_to_exits, static_argnums=1)(conf, quotas)
  counts = np.bincount(np.asarray(got), minlength=5)
  assert tuple(counts[:4]) == quotas
  assert counts[4] == 100 - sum(quotas)


def test_quotas_of_the_shared_fixture_setting():
  # p = 0.75, K = 5, n = 8: floor(8 q) = 2, 1, 1, 1 and the last exit the rest.
  probs = np.array([0.3277849, 0.24583867, 0.184379, 0.13828425, 0.10371318])
  assert weighting.exit_quotas(8, probs) == (2, 1, 1, 1)


def test_target_probs_formula():
  for k in (1, 3, 5):
    for index in (1, 15, 20, 39):
      p = index / 20
      want = np.array([p**j for j in range(1, k + 1)])
      want /= want.sum()
      got = weighting.target_probs(k, index)
      assert got.dtype == np.float32
      np.testing.assert_allclose(got, want, rtol=1e-7)
  with pytest.raises(ValueError, match='target_p_index'):
    weighting.target_probs(5, 40)


@pytest.mark.parametrize('constraint,axis', [('col', 1), ('row', 0),
                                              ('mat', None)])
def test_centring_modes(constraint, axis):
  raw = np.random.default_rng(0).normal(size=(6, 4))
  got = np.asarray(weighting.centre(jnp.asarray(raw), constraint))
  np.testing.assert_allclose(got, raw - raw.mean(axis=axis, keepdims=True),
                             atol=1e-6)
  if axis is None:
    assert abs(got.mean()) < 1e-6
  else:
    np.testing.assert_allclose(got.mean(axis=axis), 0.0, atol=1e-6)
  weights = np.asarray(weighting.sample_weights(jnp.asarray(raw), constraint,
                                                0.3))
  np.testing.assert_allclose(weights, 1 + 0.3 * got, atol=1e-6)


def test_unknown_constraint_is_named():
  with pytest.raises(ValueError, match="meta.constraint.*'diag'"):
    weighting.centre(jnp.zeros((2, 2)), 'diag')


def test_per_exit_losses_and_confidences_match_numpy():
  rng = np.random.default_rng(1)
  logits = [rng.normal(size=(7, 4)) for _ in range(3)]
  labels = rng.integers(0, 4, size=7)
  losses = np.asarray(weighting.per_exit_losses(
      [jnp.asarray(z) for z in logits], jnp.asarray(labels)))
  conf = np.asarray(weighting.exit_confidences([jnp.asarray(z)
                                                for z in logits]))
  for k, z in enumerate(logits):
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(losses[:, k], -np.log(p[np.arange(7), labels]),
                               rtol=1e-5)
    np.testing.assert_allclose(conf[:, k], p.max(1), rtol=1e-5)
    smoothed = np.asarray(weighting.per_exit_losses(
        [jnp.asarray(z)], jnp.asarray(labels), 0.1))[:, 0]
    want = 0.9 * -np.log(p[np.arange(7), labels]) + 0.1 * -np.log(p).mean(1)
    np.testing.assert_allclose(smoothed, want, rtol=1e-5)


def test_weight_net_inputs():
  losses, conf = jnp.ones((3, 2)), jnp.zeros((3, 2))
  assert weighting.weight_net_inputs(losses, conf, 'loss').shape == (3, 2)
  np.testing.assert_array_equal(
      weighting.weight_net_inputs(losses, conf, 'both'),
      np.concatenate([np.ones((3, 2)), np.zeros((3, 2))], 1))
  with pytest.raises(ValueError, match='meta.input'):
    weighting.weight_net_inputs(losses, conf, 'logits')


def test_allocated_loss_skips_empty_exits():
  losses = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
  assignment = jnp.array([2, 0, 2])
  # exit 0: mean(4) = 4; exit 1: empty, 0; exit 2: mean(3, 9) = 6.
  assert float(weighting.allocated_loss(losses, assignment)) == 10.0
