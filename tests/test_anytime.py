"""Anytime statistics against plain numpy formulas."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2w_jax.evaluation import anytime

SCALE = 2.0  # the fake model's only "parameter"


class _ExitLogitsModel:
  """Stands in for a model: `images` (B, K, C) already hold the K exits'
  logits, which `apply` returns (times the scale in `variables`) as a list."""

  def apply(self, variables, images, *, train):
    assert train is False  # evaluation runs the model in eval mode
    scale = variables['params']['scale']
    return [images[:, k] * scale for k in range(images.shape[1])]


VARIABLES = {'params': {'scale': jnp.float32(SCALE)}}


def _statistics_fn():
  """A jitted batch -> statistics, as the evaluation builds it."""
  stats = jax.jit(functools.partial(anytime.exit_statistics,
                                    _ExitLogitsModel()))
  return lambda batch: stats(VARIABLES, batch['image'], batch['label'])


def numpy_statistics(logits, labels):
  """Plain formulas on (K, B, C) logits in float64 -> dict of (K, B)."""
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  softmax = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
  label_logit = np.take_along_axis(logits, labels[None, :, None], axis=-1)
  label_logit = label_logit[..., 0]
  # 0-based rank of the label's logit among the classes (no ties here)
  rank = np.sum(logits > label_logit[..., None], axis=-1)
  log_sum_exp = logits.max(axis=-1) + np.log(np.exp(shifted).sum(axis=-1))
  prediction = logits.argmax(axis=-1)
  return {
      'confidence': softmax.max(axis=-1),
      'prediction': prediction,
      'top1': prediction == labels[None, :],
      'top5': rank < 5,
      'loss': log_sum_exp - label_logit,
  }


def _assert_matches_numpy(out, expected):
  """`out`: exit_statistics' dict or an ExitOutputs; `expected`: numpy."""
  get = out.__getitem__ if isinstance(out, dict) else functools.partial(
      getattr, out)
  for key in ('prediction', 'top1', 'top5'):
    np.testing.assert_array_equal(np.asarray(get(key)), expected[key],
                                  err_msg=key)
  chex.assert_trees_all_close(
      {k: np.asarray(get(k), np.float64) for k in ('confidence', 'loss')},
      {k: expected[k] for k in ('confidence', 'loss')}, rtol=1e-5, atol=1e-6)


def _ranked_logits(rng, ranks, num_classes):
  """Logits (K, B, C) and labels (B,) where the label's logit is the
  ranks[k, b]-th largest (0-based) at exit k, all logits at least 0.5 apart."""
  num_exits, batch = ranks.shape
  labels = rng.integers(0, num_classes, size=batch)
  logits = np.zeros((num_exits, batch, num_classes), np.float32)
  for k in range(num_exits):
    for b in range(batch):
      others = [c for c in rng.permutation(num_classes) if c != labels[b]]
      order = others[:ranks[k, b]] + [labels[b]] + others[ranks[k, b]:]
      values = (num_classes - np.arange(num_classes)
                + rng.uniform(0, 0.5, size=num_classes))
      logits[k, b, order] = values - num_classes / 2
  return logits, labels


def test_seven_classes_top5_is_rank_below_5():
  """The label at rank 4 (5th largest) is a top-5 hit, at rank 5 (6th) not."""
  rng = np.random.default_rng(0)
  ranks = np.array([[0, 1, 2, 3, 4, 5, 6, 4, 5],
                    [5, 4, 6, 0, 5, 4, 3, 1, 2]])
  logits, labels = _ranked_logits(rng, ranks, 7)
  images = jnp.asarray(logits.transpose(1, 0, 2) / SCALE)  # (B, K, C)
  out = _statistics_fn()({'image': images, 'label': jnp.asarray(labels)})
  chex.assert_shape(list(out.values()), ranks.shape)
  chex.assert_type([out['prediction'], out['top1'], out['top5']],
                   [jnp.int32, bool, bool])
  np.testing.assert_array_equal(out['top1'], ranks == 0)
  np.testing.assert_array_equal(out['top5'], ranks < 5)
  expected = numpy_statistics(logits, labels)
  np.testing.assert_array_equal(expected['top5'], ranks < 5)
  _assert_matches_numpy(out, expected)


def test_fewer_than_5_classes_top5_is_always_a_hit():
  """With 3 classes every label is within the top 5."""
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 3, size=(4, 16, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=16)
  out = _statistics_fn()({
      'image': jnp.asarray(logits.transpose(1, 0, 2) / SCALE),
      'label': jnp.asarray(labels)})
  chex.assert_shape(list(out.values()), (4, 16))
  np.testing.assert_array_equal(out['top5'], np.ones((4, 16), bool))
  expected = numpy_statistics(logits, labels)
  assert not expected['top1'].all()  # top-1 is a real test here
  _assert_matches_numpy(out, expected)


def test_random_logits_match_numpy():
  """Ten classes, logits of mixed scale (confident and unsure samples)."""
  rng = np.random.default_rng(2)
  logits = (rng.normal(size=(3, 32, 10))
            * rng.uniform(0.1, 8, size=(3, 32, 1))).astype(np.float32)
  labels = rng.integers(0, 10, size=32)
  out = _statistics_fn()({
      'image': jnp.asarray(logits.transpose(1, 0, 2) / SCALE),
      'label': jnp.asarray(labels)})
  expected = numpy_statistics(logits, labels)
  assert 0 < expected['top1'].sum() < expected['top5'].sum() < labels.size * 3
  _assert_matches_numpy(out, expected)


def _batches(logits, labels, batch_size, holes):
  """Padded batches of (B, K, C) images with a mask; `holes` are extra
  masked-out samples (garbage) inserted before the given sample indices."""
  images, batch_labels, mask = [], [], []
  for i in range(len(labels)):
    if i in holes:
      images.append(np.full(logits.shape[::2], 9.0, np.float32))
      batch_labels.append(0)
      mask.append(False)
    images.append(logits[:, i])
    batch_labels.append(labels[i])
    mask.append(True)
  while len(mask) % batch_size:  # padding at the end, as eval_batches does
    images.append(np.full(logits.shape[::2], -9.0, np.float32))
    batch_labels.append(1)
    mask.append(False)
  for start in range(0, len(mask), batch_size):
    part = slice(start, start + batch_size)
    yield {'image': jnp.asarray(np.stack(images[part]) / SCALE),
           'label': jnp.asarray(np.array(batch_labels[part])),
           'mask': np.array(mask[part])}


@pytest.mark.parametrize('num_classes', [3, 7])
def test_collect_keeps_the_unmasked_samples_in_order(num_classes):
  """Several padded batches; the result is numpy's over the real samples."""
  rng = np.random.default_rng(num_classes)
  n, num_exits = 23, 3
  ranks = rng.integers(0, num_classes, size=(num_exits, n))
  logits, labels = _ranked_logits(rng, ranks, num_classes)
  batches = list(_batches(logits, labels, 8, holes={5, 6, 17}))
  assert len(batches) == 4 and sum(int(b['mask'].sum()) for b in batches) == n
  assert not batches[0]['mask'].all() and not batches[-1]['mask'][-1]
  outputs = anytime.collect(_statistics_fn(), batches)
  assert outputs.num_samples == n
  np.testing.assert_array_equal(outputs.labels, labels)
  chex.assert_shape([outputs.confidence, outputs.prediction, outputs.top1,
                     outputs.top5, outputs.loss], (num_exits, n))
  expected = numpy_statistics(logits, labels)
  _assert_matches_numpy(outputs, expected)
  np.testing.assert_allclose(outputs.top1_accuracy(),
                             expected['top1'].sum(axis=1) * 100.0 / n,
                             rtol=1e-12)
  np.testing.assert_allclose(outputs.top5_accuracy(),
                             expected['top5'].sum(axis=1) * 100.0 / n,
                             rtol=1e-12)
  np.testing.assert_allclose(outputs.mean_loss(),
                             expected['loss'].mean(axis=1), rtol=1e-5)
  if num_classes == 7:  # top-5 is a real test here
    assert np.all(outputs.top5_accuracy() < 100.0)


def test_collect_without_a_mask_keeps_everything():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 10, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=10)
  batches = [{'image': jnp.asarray(logits[:, s].transpose(1, 0, 2) / SCALE),
              'label': jnp.asarray(labels[s])}
             for s in (slice(0, 6), slice(6, 10))]
  outputs = anytime.collect(_statistics_fn(), batches)
  np.testing.assert_array_equal(outputs.labels, labels)
  _assert_matches_numpy(outputs, numpy_statistics(logits, labels))


def test_collect_refuses_an_empty_split():
  with pytest.raises(ValueError, match='no batches'):
    anytime.collect(_statistics_fn(), [])
