"""config.meta.ablation: what each of the paper's four ablations changes,
against hand computations (docs/methods.md, 'Ablations')."""

import functools
import json
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2w_jax.meta import api, weighting
from l2w_jax.methods import l2w
from l2w_jax.optim import apply_optimizer
from l2w_jax.training import forward
from l2w_jax.training import metrics as metrics_lib
from l2w_jax.training import step as step_lib
from l2w_jax.training.learner import build_learner
from l2w_jax.training.state import compute_dtype
from tests.conftest import PROJECT_ROOT, subprocess_env
from tests.tiny import float64_step_setup, tiny_config

LR, META_LR = 0.1, 1e-2


def test_allocation_weights_by_hand():
  # 6 samples, 3 exits, shares (1/2, 1/4, 1/4): quotas 3 and 1, the last
  # exit the remaining 2.
  confidences = np.array([[.9, .1, .1], [.2, .9, .1], [.8, .3, .5],
                          [.1, .2, .9], [.7, .8, .2], [.3, .4, .6]])
  logits = [jnp.log(jnp.asarray(np.stack([c, 1 - c], 1))) for c in
            confidences.T]  # two classes: softmax max = max(c, 1 - c)
  weights = np.asarray(weighting.allocation_weights(logits, (.5, .25, .25)))
  # max(c, 1 - c) at exit 1: .9 .8 .8 .9 .7 .7 -> samples 0, 3 (0.9), then
  # 1 and 2 tie at 0.8 (lower index first): 0, 1, 3 at exit 1; exit 2's
  # most confident of 2, 4, 5 (0.7, 0.8, 0.6): 4; exit 3: 2 and 5.
  want = np.zeros((6, 3))
  want[[0, 1, 3], 0] = 6 / 3
  want[4, 1] = 6 / 1
  want[[2, 5], 2] = 6 / 2
  np.testing.assert_allclose(weights, want, rtol=1e-6)
  losses = jnp.asarray(np.random.default_rng(0).random((6, 3)))
  assignment = weighting.allocate_to_exits(
      weighting.exit_confidences(logits), weighting.exit_quotas(6, (.5, .25,
                                                                    .25)))
  np.testing.assert_allclose(
      np.sum(np.mean(weights * np.asarray(losses), 0)),
      weighting.allocated_loss(losses, assignment), rtol=1e-6)


def _float64_half(ablation, meta_learning_rate=META_LR, **meta):
  config = tiny_config(ablation=ablation, **meta)
  learner, state, images, labels = float64_step_setup(config)
  (xt, yt), (xm, ym) = forward.split_halves(images, labels)
  step = jax.jit(functools.partial(l2w.l2w_half_step, learner),
                 static_argnames='with_meta')
  new, metrics = step(state, xt, yt, xm, ym, LR, meta_learning_rate, True)
  return learner, state, (xt, yt), new, metrics


def _sgd_on(learner, state, xt, yt, loss_of):
  """The real step by hand: the optimizer on the gradient of
  loss_of(losses (B, K), exit_logits)."""
  def objective(params):
    losses, (logits, _) = forward.backbone_losses(
        learner.model, params, state.batch_stats, xt, yt,
        learner.settings.label_smoothing, compute_dtype(learner.settings))
    return loss_of(losses, logits)
  grads = jax.grad(objective)(state.params)
  return apply_optimizer(learner.tx, grads, state.opt_state, state.params,
                         LR)[0]


@pytest.mark.parametrize('ablation', ['allocation', 'fixed_weights'])
def test_the_real_step_is_sgd_on_the_ablations_loss(float64, ablation):
  """'allocation': each exit's mean loss over the training samples the
  confidence allocation gives it, summed; 'fixed_weights': sum_k c_k
  mean_b L_bk with c = K * the target shares. No meta step: the weight net
  stays as it was."""
  del float64
  learner, state, (xt, yt), new, metrics = _float64_half(ablation)
  probs = learner.option(l2w.OPTION).target_probs
  if ablation == 'allocation':
    def loss_of(losses, logits):
      confidences = weighting.exit_confidences(
          [jax.lax.stop_gradient(z) for z in logits])
      assignment = weighting.allocate_to_exits(
          confidences, weighting.exit_quotas(len(yt), probs))
      return weighting.allocated_loss(losses, assignment)
  else:
    constants = 3 * np.asarray(probs, np.float64)  # the tiny model's 3 exits
    np.testing.assert_allclose(metrics['weights'],
                               np.broadcast_to(constants, (len(yt), 3)),
                               rtol=1e-6)
    def loss_of(losses, logits):
      del logits
      return jnp.sum(jnp.asarray(constants) * jnp.mean(losses, 0))
  chex.assert_trees_all_close(new.params,
                              _sgd_on(learner, state, xt, yt, loss_of),
                              rtol=1e-10, atol=1e-12)
  assert 'meta_loss' not in metrics
  chex.assert_trees_all_equal(new.meta_params, state.meta_params)


def test_frozen_is_a_meta_learning_rate_of_zero(float64):
  """The random weight net predicts the weights and is never updated: the
  same step as L2W-DEN's with a meta learning rate of 0 (which still
  computes its meta-gradient), bit for bit."""
  del float64
  _, state, _, frozen, metrics = _float64_half('frozen')
  _, _, _, zero_lr, _ = _float64_half('none', meta_learning_rate=0.0)
  chex.assert_trees_all_equal(frozen.params, zero_lr.params)
  chex.assert_trees_all_equal(frozen.meta_params, state.meta_params)
  assert 'meta_loss' not in metrics
  assert float(np.std(metrics['weights'])) > 0  # predicted, not constant


def test_vanilla_objective_by_hand(float64):
  del float64
  losses = jnp.asarray(np.random.default_rng(1).random((6, 3)))
  value, aux = api.vanilla_objective()(None, losses, None)
  assert aux is None
  np.testing.assert_allclose(value, np.asarray(losses).mean(0).sum(),
                             rtol=1e-12)
  # The half step's meta loss is that of the virtually updated network on
  # the meta half: every exit's CE on every meta sample.
  learner, state, _, _, metrics = _float64_half('vanilla_objective')
  assert learner.option(l2w.OPTION).objective == 'vanilla'
  allocated = _float64_half('none')[4]
  assert float(metrics['meta_loss']) != float(allocated['meta_loss'])
  del state


def test_weight_statistics_are_those_of_the_pooled_samples():
  rng = np.random.default_rng(2)
  w, loss = rng.random((2, 16, 3)), rng.random((2, 16, 3))
  w[..., 2] = 1.0  # a constant column: no correlation
  moments = np.mean([step_lib.weight_moments(jnp.asarray(w[i]),
                                             jnp.asarray(loss[i]))
                     for i in range(2)], axis=0)
  stats = metrics_lib.weight_statistics(moments)
  pooled_w, pooled_l = w.reshape(32, 3), loss.reshape(32, 3)
  np.testing.assert_allclose(stats['mean'], pooled_w.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats['std'][:2], pooled_w.std(0)[:2],
                             rtol=1e-4)
  for k in range(2):
    np.testing.assert_allclose(
        stats['loss_corr'][k],
        np.corrcoef(pooled_w[:, k], pooled_l[:, k])[0, 1], atol=1e-4)
  assert stats['loss_corr'][2] is None


@pytest.mark.parametrize('meta,message', [
    ({'ablation': 'nope'}, "meta.ablation: unknown 'nope'"),
    ({'ablation': 'frozen', 'objective': 'vanilla'},
     "meta.ablation='frozen' ablates L2W-DEN's own pieces"),
    ({'ablation': 'fixed_weights', 'fixed_weights': (1.0, -1.0, 1.0)},
     'meta.fixed_weights: 3 weights >= 0'),
])
def test_impossible_ablations_are_named(meta, message):
  with pytest.raises(ValueError, match=message.replace('(', r'\(')):
    build_learner(tiny_config(**meta))


def test_main_selects_an_ablation(tmp_path):
  """--config.meta.ablation reaches the run: no meta step, and the weight
  statistics of every exit in the metrics."""
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.main',
       '--config=tests/tiny_digits_config.py', f'--workdir={tmp_path / "run"}',
       f'--config.dataset.data_dir={tmp_path / "data"}',
       '--config.meta.ablation=allocation'], cwd=PROJECT_ROOT,
      env=subprocess_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in
          (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  train_rows = [r for r in rows if 'train/loss' in r]
  assert train_rows and not any('train/meta_loss' in r for r in train_rows)
  for k in (1, 2, 3):
    assert all(r[f'train/weight_exit{k}'] == pytest.approx(1.0)
               for r in train_rows)  # B / n_k on n_k samples: mean 1
    assert all(r[f'train/weight_std_exit{k}'] > 0 for r in train_rows)
    assert all(-1 <= r[f'train/weight_loss_corr_exit{k}'] <= 1
               for r in train_rows)
  config = json.loads((tmp_path / 'run' / 'results.json').read_text())
  assert config['method'] == 'l2w'


@pytest.mark.parametrize('ablation', ['allocation', 'vanilla_objective'])
def test_an_ablation_resumes_bit_exactly(tmp_path, ablation):
  from l2w_jax.training import train  # pylint: disable=g-import-not-at-top
  from tests.tiny import tiny_train_config  # pylint: disable=g-import-not-at-top
  config = tiny_train_config('sklearn_digits', num_steps=4)
  config.dataset.data_dir = str(tmp_path / 'data')
  config.meta.ablation = ablation
  whole = train.train_and_evaluate(config, str(tmp_path / 'whole'))
  assert train.train_and_evaluate(config, str(tmp_path / 'split'),
                                  interrupt_at_step=2) == {'interrupted_at': 2}
  resumed = train.train_and_evaluate(config, str(tmp_path / 'split'))
  assert resumed['params_sha256'] == whole['params_sha256']
