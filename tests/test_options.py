"""Configuration options that change values: the weight net's output and
depth (`meta.output`, `meta.num_layers`), what it sees (`meta.input`),
`train.label_smoothing` through a training step, and the split thresholds are
searched on (`eval.protocol`).

Each test compares against a plain numpy recomputation, so that an option
that is ignored or mis-implemented changes the asserted values.
"""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2w_jax import data
from l2w_jax.evaluation import report
from l2w_jax.meta import weighting
from l2w_jax.methods import l2w
from l2w_jax.models import WeightNet
from l2w_jax.optim import apply_optimizer
from l2w_jax.training import train
from l2w_jax.training.forward import split_halves
from l2w_jax.training.learner import build_learner, init_train_state
from tests.tiny import TINY_IMAGE, tiny_config, tiny_train_config

LR, META_LR = 0.1, 1e-2


# ----------------------------------------------------------------------------
# numpy references (float64).


def _numpy_weight_net(params, x, num_layers=1, output='tanh'):
  """Linear, ReLU, [Linear, ReLU] x (num_layers - 1), Linear, tanh/sigmoid."""

  def linear(p, h):
    return (h @ np.asarray(p['kernel'], np.float64) +
            np.asarray(p['bias'], np.float64))

  h = np.maximum(linear(params['first_hidden_layer']['fc'],
                        np.asarray(x, np.float64)), 0.0)
  for i in range(num_layers - 1):
    h = np.maximum(linear(params[f'rest_hidden_layers_{i}']['fc'], h), 0.0)
  z = linear(params['output_layer'], h)
  if output == 'tanh':
    return np.tanh(z)
  return 1.0 / (1.0 + np.exp(-z))


def _numpy_weights(raw, epsilon):
  """w = 1 + epsilon * (raw - per-sample mean): the default 'col' constraint."""
  return 1.0 + epsilon * (raw - raw.mean(axis=1, keepdims=True))


def _log_softmax(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _numpy_losses(exit_logits, labels, smoothing=0.0):
  """(1 - s) * NLL + s * mean_c(-log p_c) per sample and exit: (B, K)."""
  labels = np.asarray(labels)
  columns = []
  for logits in exit_logits:
    log_probs = _log_softmax(logits)
    nll = -log_probs[np.arange(len(labels)), labels]
    columns.append((1 - smoothing) * nll +
                   smoothing * -log_probs.mean(axis=-1))
  return np.stack(columns, axis=1)


def _numpy_confidences(exit_logits):
  return np.stack([np.exp(_log_softmax(z)).max(axis=-1) for z in exit_logits],
                  axis=1)


def _tree_max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(
      jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _batch():
  images = jax.random.normal(jax.random.PRNGKey(1), (10,) + TINY_IMAGE)
  labels = jnp.arange(10) % 5
  return split_halves(images, labels)


def _half_step(learner, with_meta):
  return jax.jit(functools.partial(l2w.l2w_half_step, learner,
                                   with_meta=with_meta))


# ----------------------------------------------------------------------------
# Shared by the tests below, built once (eager init and compiles are slow).


@pytest.fixture(scope='session')
def learner():
  """The default tiny learner; every tiny_config variant used here has the
  same backbone, optimizers and weight-net parameter shapes."""
  return build_learner(tiny_config())


@pytest.fixture(scope='session')
def state(learner):
  return init_train_state(learner, jax.random.PRNGKey(0), TINY_IMAGE)


@pytest.fixture(scope='session')
def forward(learner):
  """f(params, batch_stats, images) -> exit logits of the train-mode forward
  (batch statistics), as the half step runs the backbone."""

  def apply(params, batch_stats, images):
    logits, _ = learner.model.apply(
        {'params': params, 'batch_stats': batch_stats}, images, train=True,
        mutable=['batch_stats'])
    return logits

  return jax.jit(apply)


@pytest.fixture(scope='session')
def sgd_step(learner):
  """f(state, images, labels, weights (B, K), smoothing, lr) -> parameters
  after one SGD step on sum_k mean_b(w_bk * CE_s), written without the
  library's loss code."""

  def loss(params, batch_stats, images, labels, weights, smoothing):
    logits, _ = learner.model.apply(
        {'params': params, 'batch_stats': batch_stats}, images, train=True,
        mutable=['batch_stats'])
    total = 0.0
    for k, z in enumerate(logits):
      log_probs = jax.nn.log_softmax(z, axis=-1)
      nll = -log_probs[jnp.arange(labels.shape[0]), labels]
      ce = (1 - smoothing) * nll + smoothing * -jnp.mean(log_probs, axis=-1)
      total += jnp.mean(weights[:, k] * ce)
    return total

  def step(state, images, labels, weights, smoothing, lr):
    grads = jax.grad(loss)(state.params, state.batch_stats, images, labels,
                           weights, smoothing)
    params, _ = apply_optimizer(learner.tx, grads, state.opt_state,
                                state.params, lr)
    return params

  return jax.jit(step)


# ----------------------------------------------------------------------------
# meta.output and meta.num_layers.


def _inputs(num=6, num_inputs=3):
  """Spread-out inputs, so that the outputs are far from saturation and 0."""
  return 2.0 * jax.random.normal(jax.random.PRNGKey(7), (num, num_inputs))


def test_sigmoid_weight_net_is_sigmoid_of_the_mlp():
  net = WeightNet(num_inputs=3, num_exits=3, hidden_size=8, output='sigmoid')
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))['params']
  x = _inputs()
  out = np.asarray(net.apply({'params': params}, x))
  np.testing.assert_allclose(
      out, _numpy_weight_net(params, x, output='sigmoid'), rtol=1e-5,
      atol=1e-6)
  assert np.all((out > 0) & (out < 1))


def test_learner_weight_net_uses_sigmoid(state):
  learner = build_learner(tiny_config(output='sigmoid'))
  assert learner.weight_net.output == 'sigmoid'
  x = jnp.abs(_inputs())  # losses are non-negative
  epsilon = learner.option(l2w.OPTION).epsilon
  expected = _numpy_weights(
      _numpy_weight_net(state.meta_params, x, output='sigmoid'), epsilon)
  got = l2w.predict_weights(learner, state.meta_params, x)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # tanh on the same parameters would give other weights.
  with_tanh = _numpy_weights(_numpy_weight_net(state.meta_params, x), epsilon)
  assert np.max(np.abs(with_tanh - expected)) > 1e-3


def test_deeper_weight_net_has_the_extra_hidden_layers():
  net = WeightNet(num_inputs=3, num_exits=3, hidden_size=8, num_layers=3)
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))['params']
  assert set(params) == {'first_hidden_layer', 'rest_hidden_layers_0',
                         'rest_hidden_layers_1', 'output_layer'}
  chex.assert_trees_all_equal_shapes(
      params['rest_hidden_layers_1'],
      {'fc': {'kernel': jnp.zeros((8, 8)), 'bias': jnp.zeros((8,))}})
  x = _inputs()
  out = np.asarray(net.apply({'params': params}, x))
  np.testing.assert_allclose(out, _numpy_weight_net(params, x, num_layers=3),
                             rtol=1e-5, atol=1e-6)
  # Skipping the extra layers gives another function.
  assert np.max(np.abs(out - _numpy_weight_net(params, x))) > 1e-3


def test_learner_passes_num_layers_to_the_weight_net():
  deep = build_learner(tiny_config(num_layers=3))
  assert deep.weight_net.num_layers == 3
  # What init_train_state builds, without the (slow, eager) backbone init.
  meta_params = deep.weight_net.init(
      jax.random.PRNGKey(0), jnp.zeros((1, deep.weight_net.num_inputs)))[
          'params']
  assert set(meta_params) == {'first_hidden_layer', 'rest_hidden_layers_0',
                              'rest_hidden_layers_1', 'output_layer'}
  x = jnp.abs(_inputs())
  expected = _numpy_weights(_numpy_weight_net(meta_params, x, num_layers=3),
                            deep.option(l2w.OPTION).epsilon)
  np.testing.assert_allclose(l2w.predict_weights(deep, meta_params, x),
                             expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# meta.input.


def test_confidence_input_drives_the_real_step_weights(state, forward):
  conf = build_learner(tiny_config(input='conf'))
  assert conf.option(l2w.OPTION).input_kind == 'conf'
  (xt, yt), (xm, ym) = _batch()
  # Without the meta step the weight net is the initial one.
  _, metrics = _half_step(conf, with_meta=False)(state, xt, yt, xm, ym, LR,
                                                 META_LR)
  logits = forward(state.params, state.batch_stats, xt)
  epsilon = conf.option(l2w.OPTION).epsilon
  from_conf = _numpy_weights(
      _numpy_weight_net(state.meta_params, _numpy_confidences(logits)),
      epsilon)
  np.testing.assert_allclose(metrics['weights'], from_conf, rtol=1e-5,
                             atol=1e-6)
  from_losses = _numpy_weights(
      _numpy_weight_net(state.meta_params, _numpy_losses(logits, yt)),
      epsilon)
  assert np.max(np.abs(from_losses - from_conf)) > 1e-3


# ----------------------------------------------------------------------------
# train.label_smoothing.

SMOOTHING = 0.1


@pytest.fixture(scope='session')
def smoothed_step(state):
  """(learner, new_state, metrics) of one meta half step with smoothing."""
  config = tiny_config()
  config.train.label_smoothing = SMOOTHING
  smooth = build_learner(config)
  (xt, yt), (xm, ym) = _batch()
  new_state, metrics = _half_step(smooth, with_meta=True)(state, xt, yt, xm,
                                                          ym, LR, META_LR)
  return smooth, new_state, metrics


def test_label_smoothing_shapes_the_losses_and_the_update(
    state, forward, sgd_step, smoothed_step):
  smooth, new_state, metrics = smoothed_step
  assert smooth.settings.label_smoothing == pytest.approx(SMOOTHING)
  (xt, yt), _ = _batch()
  logits = forward(state.params, state.batch_stats, xt)
  np.testing.assert_allclose(metrics['losses'],
                             _numpy_losses(logits, yt, SMOOTHING), rtol=1e-5,
                             atol=1e-6)
  # The real step descends the smoothed weighted loss, not the plain one.
  weights = metrics['weights']
  smoothed = sgd_step(state, xt, yt, weights, SMOOTHING, LR)
  plain = sgd_step(state, xt, yt, weights, 0.0, LR)
  chex.assert_trees_all_close(new_state.params, smoothed, atol=1e-6)
  assert _tree_max_diff(smoothed, plain) > 1e-4


def test_meta_loss_is_not_smoothed(state, forward, sgd_step, smoothed_step):
  """The virtual step descends smoothed losses; the meta loss is plain CE."""
  smooth, _, metrics = smoothed_step
  (xt, yt), (xm, ym) = _batch()
  # The virtual step, by hand: weights from the initial weight net on the
  # smoothed losses, one SGD step on the weighted smoothed loss.
  logits = forward(state.params, state.batch_stats, xt)
  pseudo = _numpy_weights(
      _numpy_weight_net(state.meta_params,
                        _numpy_losses(logits, yt, SMOOTHING)),
      smooth.option(l2w.OPTION).epsilon)
  np.testing.assert_allclose(metrics['pseudo_weights'], pseudo, rtol=1e-5,
                             atol=1e-6)
  virtual = sgd_step(state, xt, yt, jnp.asarray(pseudo, jnp.float32),
                     SMOOTHING, LR)
  meta_logits = forward(virtual, state.batch_stats, xm)
  quotas = weighting.exit_quotas(len(ym), smooth.option(l2w.OPTION).target_probs)
  assignment = np.asarray(weighting.allocate_to_exits(
      jnp.asarray(_numpy_confidences(meta_logits), jnp.float32), quotas))
  np.testing.assert_array_equal(metrics['exit_assignment'], assignment)

  def allocated(losses):
    return sum(losses[assignment == k, k].mean()
               for k in range(losses.shape[1]) if np.any(assignment == k))

  plain = allocated(_numpy_losses(meta_logits, ym))
  smoothed = allocated(_numpy_losses(meta_logits, ym, SMOOTHING))
  assert abs(plain - smoothed) > 1e-3
  np.testing.assert_allclose(float(metrics['meta_loss']), plain, rtol=1e-5)


# ----------------------------------------------------------------------------
# train.compute_dtype: bfloat16 activations, float32 everything else.


def test_bfloat16_compute_dtype_keeps_parameters_and_losses_float32(
    learner, state):
  config = tiny_config()
  config.train.compute_dtype = 'bfloat16'
  bf16 = build_learner(config)
  (x1, y1), (x2, y2) = _batch()
  step = jax.jit(functools.partial(l2w.l2w_half_step, bf16, with_meta=True))
  hlo = step.lower(state, x1, y1, x2, y2, LR, META_LR).as_text()
  # The convolutions (forward and the gradients') run on bfloat16.
  convolutions = [l for l in hlo.splitlines() if 'convolution' in l]
  assert convolutions and all('bf16' in l for l in convolutions)
  new, metrics = step(state, x1, y1, x2, y2, LR, META_LR)
  reference, expected = _half_step(learner, True)(state, x1, y1, x2, y2, LR,
                                                  META_LR)
  chex.assert_trees_all_equal_dtypes(new, state)  # float32 state
  for key in ('losses', 'weights', 'meta_loss', 'train_loss'):
    assert metrics[key].dtype == jnp.float32, key
  # bfloat16 rounding (8 bits of mantissa) moves the losses by ~1e-2
  # relative, not more; the update is the float32 one up to that rounding.
  np.testing.assert_allclose(metrics['losses'], expected['losses'],
                             rtol=5e-2)
  assert not np.array_equal(metrics['losses'], expected['losses'])
  chex.assert_trees_all_close(new.params, reference.params, atol=2e-2)
  assert float(metrics['meta_loss']) > 0


def test_unknown_compute_dtype_is_named():
  config = tiny_config()
  config.train.compute_dtype = 'float16'
  with pytest.raises(ValueError, match="train.compute_dtype: unknown dtype "
                     "'float16'"):
    build_learner(config)


# ----------------------------------------------------------------------------
# eval.protocol: where thresholds are searched.


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory):
  """One sklearn_digits tfds directory for the tests of this section."""
  return str(tmp_path_factory.mktemp('data'))


def _digits_config(data_dir, protocol):
  config = tiny_train_config('sklearn_digits', num_steps=1)
  config.dataset.data_dir = data_dir
  config.eval.protocol = protocol
  config.eval.threshold_augment = protocol == 'train'
  return config


def _fake_statistics(seen):
  """`ExitStatistics` whose function records its images; one exit."""

  def statistics(variables, batch):
    del variables
    seen.append(np.asarray(batch['image']))
    labels = batch['label']
    n = len(labels)
    return {'confidence': np.ones((1, n)), 'prediction': labels[None],
            'top1': np.ones((1, n), bool), 'top5': np.ones((1, n), bool),
            'loss': np.zeros((1, n))}

  return report.ExitStatistics(statistics)


def _masked(batches, key):
  return np.concatenate([b[key][b['mask']] for b in batches])


def test_threshold_outputs_come_from_the_augmented_training_split(digits_dir):
  config = _digits_config(digits_dir, 'train')
  info = data.data_info(config)
  assert 0 < info.num_holdout < info.num_train
  batch = config.eval.batch_size

  seen = []
  outputs = report.threshold_outputs(config, _fake_statistics(seen), None)
  assert outputs.num_samples == info.num_train
  plain = list(data.eval_batches(config, 'train', batch))
  np.testing.assert_array_equal(outputs.labels, _masked(plain, 'label'))
  # Augmented (random crops): not the plain training images.
  assert not np.allclose(np.concatenate(seen), np.concatenate(
      [b['image'] for b in plain]))

  config.eval.protocol = 'holdout'
  config.eval.threshold_augment = False
  outputs = report.threshold_outputs(config, _fake_statistics([]), None)
  assert outputs.num_samples == info.num_holdout
  np.testing.assert_array_equal(
      outputs.labels,
      _masked(data.eval_batches(config, 'holdout', batch), 'label'))


def test_training_run_searches_thresholds_on_the_training_set(digits_dir,
                                                              tmp_path):
  config = _digits_config(digits_dir, 'train')
  # The source of thresholds does not depend on the method; the uniform step
  # compiles much faster than the meta step. Large eval batches: few calls.
  config.method = 'uniform'
  config.eval.batch_size = 512
  num_train = data.data_info(config).num_train
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['threshold_source'] == 'train'
  assert results['num_threshold_samples'] == num_train
  on_disk = json.loads((tmp_path / 'run' / train.RESULTS_FILE).read_text())
  assert on_disk['threshold_source'] == 'train'
  assert on_disk['num_threshold_samples'] == num_train
