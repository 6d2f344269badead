"""`experiments.check_reference` on the original's fixtures and bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import PROJECT_ROOT, subprocess_env


def _check_reference(*args):
  env = subprocess_env()
  # Float64 iterations of the CIFAR-100 MSDNet: running them dominates, so
  # XLA optimises as for a user's run (the six-iteration fixture: 92 s
  # against 132 s unoptimised on the 2-core AMD EPYC).
  env.pop('JAX_DISABLE_MOST_OPTIMIZATIONS')
  out = subprocess.run([sys.executable, '-m', 'experiments.check_reference',
                        *map(str, args)], cwd=PROJECT_ROOT, env=env,
                       capture_output=True, text=True, timeout=1200)
  lines = [json.loads(l) for l in out.stdout.splitlines() if l.startswith('{')]
  return out.returncode, lines, out.stderr


def _passing_run(fixtures, save_dir, kinds):
  """check_reference --save on `fixtures`: exit 0, one line per fixture of
  the given kinds, in order; returns the lines."""
  code, lines, stderr = _check_reference(*fixtures, '--save', save_dir)
  assert code == 0, stderr[-2000:]
  assert [l['kind'] for l in lines] == kinds
  return lines


@pytest.mark.long
def test_shared_fixtures_pass(shared_reference, tmp_path):
  fixtures = [shared_reference / 'msdnet_cifar100_forward.npz',
              shared_reference / 'l2w_iteration_cifar100.npz',
              shared_reference / 'dynamic_eval_reference.npz']
  lines = _passing_run(fixtures, tmp_path,
                       ['forward', 'l2w_iteration', 'dynamic_eval'])
  for line in lines:
    assert line['passed'] and line['compared']
  checks = lines[1]['checks']
  assert checks['half1/meta_grad']['error'] <= 1e-6
  assert checks['half2/exit_assignment']['error'] == 0.0
  assert checks['after/model']['error'] <= 1e-6
  assert len(checks) == 12
  # Rebuilt from the input count, so it is listed but never counted.
  assert list(lines[1]['not_compared']) == ['after/model/num_batches_tracked']
  assert 'after/model/num_batches_tracked' not in checks
  # Budgeted evaluation: exact, not merely within tolerance.
  assert all(c['error'] == 0.0 for c in lines[2]['checks'].values())
  assert set(lines[2]['checks']) == {'val_acc', 'test_acc', 'test_flops',
                                     'thresholds'}
  # --save wrote every expected entry of each fixture, under the same names.
  for fixture in fixtures:
    with np.load(fixture) as want, np.load(tmp_path / fixture.name) as got:
      expected = [k for k in want.files if k.startswith('expected')]
      assert expected and set(expected) <= set(got.files)
      for key in expected:
        assert got[key].shape == want[key].shape, key


@pytest.mark.long
def test_whole_training_run_matches_the_original(shared_reference, tmp_path):
  """Six iterations of the original's train() (two epochs, meta_interval
  2, empty optimizer states at the start) through the training loop's own
  schedule and iteration, every iteration checked by the README's
  tolerances."""
  fixture = shared_reference / 'l2w_training_cifar.npz'
  line, = _passing_run([fixture], tmp_path, ['l2w_training'])
  assert line['passed'] and line['compared']
  checks = line['checks']
  assert sorted(line['worst_per_iteration']) == [
      f'iteration{t}' for t in range(1, 7)]
  for t in range(1, 7):
    for name in ('model_params', 'bn_running_stats', 'momentum', 'meta_net',
                 'adam_exp_avg', 'lr', 'meta_lr', 'schedule_and_adam_step',
                 'half1/weights', 'half2/train_loss'):
      assert f'iteration{t}/{name}' in checks, (t, name)
  # The meta step's outputs are compared exactly where the original made
  # one (iterations 1, 3, 4, 6), and nowhere else.
  meta = [t for t in range(1, 7) if f'iteration{t}/half1/meta_grad' in checks]
  assert meta == [1, 3, 4, 6]
  assert checks['iteration4/half2/exit_assignment']['error'] == 0.0
  assert checks['iteration6/meta_net']['error'] <= 1e-11
  assert list(line['not_compared']) == ['model/num_batches_tracked']
  with np.load(fixture) as want, np.load(tmp_path / fixture.name) as got:
    for key in (k for k in want.files if k.startswith('expected')):
      if key != 'expected/allocation_min_gap':
        assert got[key].shape == want[key].shape, key


@pytest.mark.long
def test_imta_and_boostnet_fixtures_pass(shared_reference, tmp_path):
  """IMTA's gradient equilibrium and stage 2, and BoostNet, float64 against
  the original's numbers, by the README's tolerances."""
  fixtures = [shared_reference / 'ge_gradients_cifar100.npz',
              shared_reference / 'boostnet_gradients_cifar100.npz',
              shared_reference / 'imta_stage2_cifar100.npz']
  lines = _passing_run(fixtures, tmp_path,
                       ['ge_gradients', 'boostnet_gradients', 'imta_stage2'])
  ge, boost, imta = (l['checks'] for l in lines)
  assert set(imta) == {'loss', 'grad', 'train_logits', 'eval_logits',
                       'bn_after_train_forward'}
  assert imta['loss']['error'] <= 1e-9 and imta['grad']['error'] <= 1e-6
  assert imta['bn_after_train_forward']['error'] <= 1e-6
  assert all(c['passed'] for c in imta.values())
  assert set(ge) == {'exit_losses', 'grad'}
  assert set(boost) == {'stage_losses', 'grad', 'eval_ensemble_logits'}
  assert ge['exit_losses']['error'] <= 1e-9 and ge['grad']['error'] <= 1e-6
  assert boost['stage_losses']['error'] <= 1e-9
  assert boost['grad']['error'] <= 1e-6
  assert boost['eval_ensemble_logits']['error'] <= 1e-9 * 100
  gradients = [218, 218, 20]  # every parameter; IMTA: heads and ISC only
  for fixture, count in zip(fixtures, gradients):
    with np.load(fixture) as want, np.load(tmp_path / fixture.name) as got:
      expected = [k for k in want.files if k.startswith('expected')]
      assert len([k for k in expected if '/grad/' in k]) == count
      assert set(expected) <= set(got.files)  # all under their own names


def test_save_format_of_an_inputs_only_fixture(shared_reference, tmp_path):
  """--save on a fixture without expected entries writes a file that is
  itself a fixture; what it holds equals the original's numbers."""
  original = shared_reference / 'msdnet_cifar100_forward.npz'
  with np.load(original) as data:
    inputs = {k: data[k] for k in data.files if not k.startswith('expected')}
  bare = tmp_path / 'inputs_only.npz'
  np.savez(bare, **inputs)
  out = tmp_path / 'computed.npz'
  code, lines, stderr = _check_reference(bare, '--save', out)
  assert code == 0, stderr[-2000:]
  assert lines[0]['compared'] is False and lines[0]['checks'] == {}
  with np.load(out) as got, np.load(original) as want:
    expected = [k for k in want.files if k.startswith('expected')]
    assert sorted(k for k in got.files if k.startswith('expected')) == sorted(
        expected)
    for key in expected:  # the forward fixture's own tolerances
      scale = max(1.0, float(np.max(np.abs(want[key]))))
      tolerance = (1e-4 * scale if 'logits' in key else 1e-5)
      np.testing.assert_allclose(got[key], want[key], rtol=0,
                                 atol=tolerance, err_msg=key)
  # The saved file reads back as a fixture of the same kind.
  code, lines, _ = _check_reference(out)
  assert code == 0 and lines[0]['compared'] and lines[0]['passed']


def test_a_wrong_value_fails(shared_reference, tmp_path):
  with np.load(shared_reference / 'msdnet_cifar100_forward.npz') as data:
    arrays = {k: data[k] for k in data.files}
  arrays['expected/eval_logits/2'] = arrays['expected/eval_logits/2'] + 1e-3
  broken = tmp_path / 'broken.npz'
  np.savez(broken, **arrays)
  code, lines, _ = _check_reference(broken)
  assert code == 1
  assert lines[0]['passed'] is False
  assert lines[0]['checks']['eval_logits']['passed'] is False
  assert lines[0]['checks']['train_logits']['passed'] is True


def test_unknown_kind_and_missing_keys_are_named(tmp_path):
  odd = tmp_path / 'odd.npz'
  np.savez(odd, config_json=np.array(json.dumps({'kind': 'telepathy'})))
  lacking = tmp_path / 'lacking.npz'
  np.savez(lacking, config_json=np.array(json.dumps({
      'kind': 'forward', 'data': 'cifar10', 'stepmode': 'even'})),
           **{'model/classifier.0.linear.bias': np.zeros(10, np.float32)})
  code, lines, _ = _check_reference(odd, lacking)
  assert code == 1
  assert "unknown fixture kind 'telepathy'" in lines[0]['error']
  assert "lacks entries ['x']" in lines[1]['error']


def test_a_fixture_of_another_backbone_is_named_not_misread():
  from l2w_jax.reference.fixtures import FixtureError, fixture_model, msdnet_config  # pylint: disable=g-import-not-at-top
  config = {'data': 'cifar10', 'stepmode': 'even', 'model': 'ranet'}
  with pytest.raises(FixtureError, match="model 'ranet' is not an MSDNet"):
    msdnet_config(config)
  assert msdnet_config({**config, 'model': 'msdnet'}).num_classes == 10
  with pytest.raises(FixtureError, match='lacks "scale_list"'):
    fixture_model(config)
  ranet = fixture_model({**config, 'scale_list': [1, 2, 3]})
  assert type(ranet).__name__ == 'RANet' and ranet.cfg.num_exits == 6


def test_ranet_forward_fixture_passes(shared_reference, tmp_path):
  """The original RANet's logits per exit (eval and train mode) and BN
  statistics, from the configuration in the archive."""
  fixture = shared_reference / 'ranet_cifar10_forward.npz'
  lines = _passing_run([fixture], tmp_path / 'ranet.npz', ['forward'])
  checks = lines[0]['checks']
  assert set(checks) == {'eval_logits', 'train_logits',
                         'running_stats_after_train_forward'}
  assert all(c['passed'] for c in checks.values())
  with np.load(fixture) as want, np.load(tmp_path / 'ranet.npz') as got:
    expected = [k for k in want.files if k.startswith('expected')]
    assert len([k for k in expected if 'logits' in k]) == 16  # 8 exits x 2
    assert set(expected) <= set(got.files)
