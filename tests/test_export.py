"""experiments.export and l2w_jax.serving on a tiny trained digits run: the
exported Predictor, in a process that cannot import TensorFlow, reproduces
the run's 39-budget results; its errors name the problem and the fix."""

import json
import os
import resource
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from l2w_jax import paths
from l2w_jax.serving import Predictor, artifact, normalize, write_artifact
from l2w_jax.training import train
from tests.conftest import NO_TENSORFLOW, PROJECT_ROOT, subprocess_env
from tests.tiny import tiny_train_config

pytestmark = pytest.mark.long

# 3 steps (test_evaluate's run) leave a model that predicts one class at
# every exit, whose accuracy is the same at every budget; after 8 the
# budgets' test top-1 take 14 different values.
NUM_STEPS = 8
# Prediction in chunks of 64: the 360 test images make 5 full chunks and a
# short one of 40.
MAX_BATCH = 64

# Run in a fresh interpreter without TensorFlow (`conftest.NO_TENSORFLOW`);
# prints one JSON line.
_CHILD = NO_TENSORFLOW + r'''
import numpy as np
from l2w_jax.serving import Predictor

artifact, test_file, max_batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
predictor = Predictor.load(artifact, max_batch=max_batch)
test = np.load(test_file)
rows = []
for budget in range(1, 40):
  out = predictor(test['images'], budget=budget)
  rows.append({'budget': out.budget, 'labels': out.labels.tolist(),
               'exits': out.exits.tolist(),
               'mean_mflops': float(out.mflops.mean())})
# One image at a time (the latency program) agrees with the batches.
one_by_one = [predictor(test['images'][i:i + 1], budget=20)
              for i in range(0, len(test['images']), 37)]
single = {'labels': [int(o.labels[0]) for o in one_by_one],
          'exits': [int(o.exits[0]) for o in one_by_one]}
# The StableHLO programs, with budget 20's thresholds.
from l2w_jax.serving import stablehlo
thresholds = np.asarray(predictor.budgets[19].thresholds, np.float32)
batch = stablehlo.load_program(f'{artifact}/{stablehlo.BATCH_FILE}')
latency = stablehlo.load_program(f'{artifact}/{stablehlo.LATENCY_FILE}')
labels, exits = batch.call(test['images'], thresholds)
one = [latency.call(test['images'][i:i + 1], thresholds)
       for i in range(0, len(test['images']), 37)]
programs = {'batch': {'labels': np.asarray(labels).tolist(),
                      'exits': np.asarray(exits).tolist()},
            'latency': {'labels': [int(l) for l, _ in one],
                        'exits': [int(e) for _, e in one]},
            'platforms': [list(batch.platforms), list(latency.platforms)]}
print(json.dumps({
    'rows': rows, 'single_budget_20': single, 'programs': programs,
    'uses_cascade': predictor.uses_cascade,
    'attempts': attempts,
    'loaded': sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)}))
'''


def _run(*args):
  return subprocess.run([sys.executable, *args], cwd=PROJECT_ROOT,
                        env=subprocess_env(), capture_output=True, text=True,
                        timeout=600)


def _export(*flags):
  return _run('-m', 'experiments.export',
              '--config=tests/tiny_digits_config.py',
              f'--config.train.num_steps={NUM_STEPS}', *flags)


def _test_split(config) -> tuple[np.ndarray, np.ndarray]:
  """The normalised test images and labels, as the evaluation reads them."""
  from l2w_jax import data  # pylint: disable=g-import-not-at-top
  images, labels = [], []
  for batch in data.eval_batches(config, 'test', config.eval.batch_size):
    images.append(batch['image'][batch['mask']])
    labels.append(batch['label'][batch['mask']])
  return np.concatenate(images), np.concatenate(labels)


@pytest.fixture(scope='session')
def exported(tmp_path_factory):
  """A trained, evaluated and exported run, and its test split in test.npz."""
  root = tmp_path_factory.mktemp('export')
  config = tiny_train_config('sklearn_digits', num_steps=NUM_STEPS)
  config.dataset.data_dir = str(root / 'data')
  train.train_and_evaluate(config, str(root / 'run'))
  out = _export(f'--workdir={root / "run"}', f'--out={root / "model"}',
                f'--config.dataset.data_dir={root / "data"}', '--stablehlo')
  assert out.returncode == 0, out.stderr[-2000:]
  images, labels = _test_split(config)
  np.savez(root / 'test.npz', images=images, labels=labels)
  return types.SimpleNamespace(
      root=root, config=config, model=root / 'model', stdout=out.stdout,
      results=json.loads((root / 'run' / 'results.json').read_text()),
      test_file=root / 'test.npz', images=images, labels=labels)


def test_served_model_reproduces_the_budgeted_results(exported):
  assert f'artifact in {exported.model}' in exported.stdout
  assert 'MB' in exported.stdout and 'Predictor.load' in exported.stdout
  child = _run('-c', _CHILD, str(exported.model), str(exported.test_file),
               str(MAX_BATCH))
  assert child.returncode == 0, child.stderr[-3000:]
  out = json.loads(child.stdout.strip().splitlines()[-1])
  assert out['attempts'] == [] and out['loaded'] == []
  assert out['uses_cascade']
  rows = exported.results['budgeted']
  assert len(out['rows']) == len(rows) == 39
  labels, n = exported.labels, len(exported.labels)
  accuracies = set()
  for got, want in zip(out['rows'], rows, strict=True):
    budget = want['budget_index']
    assert got['budget'] == budget
    correct = int(np.sum(np.asarray(got['labels']) == labels))
    # The formula of budgeted.accuracy_and_flops, compared with ==.
    assert correct * 100.0 / n == want['test_top1'], budget
    counts = np.bincount(got['exits'], minlength=len(want['thresholds']))
    assert counts.tolist() == want['test_exit_counts'], budget
    # results.json weighs the exits with float32 fractions.
    np.testing.assert_allclose(got['mean_mflops'], want['mflops'],
                               rtol=1e-6, err_msg=f'budget {budget}')
    accuracies.add(want['test_top1'])
  assert len(accuracies) > 5  # the comparison is not a constant
  batched = out['rows'][19]
  assert out['single_budget_20'] == {
      'labels': batched['labels'][::37], 'exits': batched['exits'][::37]}
  # The StableHLO programs (lowered for CPU, CUDA and TPU) predict the same.
  programs = out['programs']
  assert programs['batch'] == {'labels': batched['labels'],
                               'exits': batched['exits']}
  assert programs['latency'] == out['single_budget_20']
  assert programs['platforms'] == [['cpu', 'cuda', 'tpu']] * 2


def test_normalize_is_the_pipelines_bit_for_bit(exported):
  """Predictor.normalize on the stored uint8 test images gives the float32
  images of the evaluation pipeline, bit for bit; so does `normalize` with
  the CIFAR and ImageNet constants against augment.to_float_normalized in a
  tf.data map, on every grey level."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from l2w_jax.data import augment, catalogue, digits, in_memory  # pylint: disable=g-import-not-at-top
  predictor = Predictor.load(exported.model)
  raw, raw_labels, _ = in_memory._load_split(  # pylint: disable=protected-access
      digits.NAME, exported.config.dataset.data_dir, 'test')
  np.testing.assert_array_equal(raw_labels, exported.labels)
  ours = predictor.normalize(raw)
  assert ours.dtype == np.float32
  np.testing.assert_array_equal(ours.view(np.uint32),
                                exported.images.view(np.uint32))
  levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, -1)
  for mean, std in ((catalogue.CIFAR10_MEAN, catalogue.CIFAR10_STD),
                    (catalogue.CIFAR100_MEAN, catalogue.CIFAR100_STD),
                    (catalogue.IMAGENET_MEAN, catalogue.IMAGENET_STD)):
    ds = tf.data.Dataset.from_tensors(levels).map(
        lambda x, m=mean, s=std: augment.to_float_normalized(x, m, s))
    want = next(ds.as_numpy_iterator())
    np.testing.assert_array_equal(normalize(levels, mean, std).view(np.uint32),
                                  want.view(np.uint32))


def test_max_mflops_picks_the_most_accurate_affordable_budget(exported):
  predictor = Predictor.load(exported.model, max_batch=MAX_BATCH)
  budgets = predictor.budgets
  assert [b.index for b in budgets] == list(range(1, 40))
  for limit in (budgets[0].mflops, budgets[19].mflops, budgets[-1].mflops,
                1e9):
    affordable = [b for b in budgets if b.mflops <= limit]
    best = max(b.val_top1 for b in affordable)
    index = predictor.budget_for(limit)
    chosen = budgets[index - 1]
    assert chosen.mflops <= limit and chosen.val_top1 == best
    assert chosen.mflops == min(b.mflops for b in affordable
                                if b.val_top1 == best)
  out = predictor(exported.images[:5], max_mflops=budgets[19].mflops)
  assert out.budget == predictor.budget_for(budgets[19].mflops)
  assert out.labels.shape == out.exits.shape == out.mflops.shape == (5,)
  np.testing.assert_array_equal(out.mflops,
                                predictor.mflops_per_exit[out.exits])
  cheapest = min(b.mflops for b in budgets)
  with pytest.raises(ValueError, match='no budget costs at most .*raise '
                     'max_mflops'):
    predictor(exported.images[:1], max_mflops=cheapest / 2)
  with pytest.raises(ValueError, match='exactly one of budget='):
    predictor(exported.images[:1], budget=3, max_mflops=1e9)
  with pytest.raises(ValueError, match='exactly one of budget='):
    predictor(exported.images[:1])


def test_predictor_errors_name_the_problem_and_the_fix(exported, tmp_path):
  with pytest.raises(FileNotFoundError, match='no serving artifact at .*'
                     'experiments.export'):
    Predictor.load(tmp_path / 'missing')

  def damaged(name):
    copy = tmp_path / name
    shutil.copytree(exported.model, copy)
    return copy

  incomplete = damaged('incomplete')
  (incomplete / artifact.CONFIG_FILE).unlink()
  with pytest.raises(FileNotFoundError, match='missing config.json.*'
                     're-export'):
    Predictor.load(incomplete)
  garbage = damaged('garbage')
  (garbage / artifact.VARIABLES_FILE).write_bytes(b'\xc1 not msgpack')
  with pytest.raises(ValueError, match='not a readable msgpack file.*'
                     're-export'):
    Predictor.load(garbage)
  truncated = damaged('truncated')
  content = (truncated / artifact.VARIABLES_FILE).read_bytes()
  (truncated / artifact.VARIABLES_FILE).write_bytes(content[:len(content)
                                                            // 2])
  with pytest.raises(ValueError, match='not a readable msgpack file'):
    Predictor.load(truncated)
  flipped = damaged('flipped')
  changed = bytearray(content)
  changed[-100] ^= 0xff  # inside an array: still readable msgpack
  (flipped / artifact.VARIABLES_FILE).write_bytes(bytes(changed))
  with pytest.raises(ValueError, match='does not match the artifact\'s '
                     'params_sha256.*re-export'):
    Predictor.load(flipped)
  future = damaged('future')
  spec = json.loads((future / artifact.SERVING_FILE).read_text())
  (future / artifact.SERVING_FILE).write_text(json.dumps(
      dict(spec, format_version=artifact.FORMAT_VERSION + 1)))
  with pytest.raises(ValueError, match='format version 2, this code reads '
                     'version 1: re-export'):
    Predictor.load(future)

  predictor = Predictor.load(exported.model)
  images = exported.images[:2]
  for budget in (0, 40, 2.0, True, '5'):
    with pytest.raises(ValueError, match=r'budget must be a budget index in '
                       r'1\.\.39'):
      predictor(images, budget=budget)
  with pytest.raises(ValueError, match=r'shape \(N, 32, 32, 3\), got '
                     r'\(2, 16, 32, 3\)'):
    predictor(images[:, :16], budget=5)
  with pytest.raises(ValueError, match='must be float32.*astype'):
    predictor(images.astype(np.float64), budget=5)
  with pytest.raises(ValueError, match='uint8 images: normalise them first'):
    predictor(np.zeros((2, 32, 32, 3), np.uint8), budget=5)
  with pytest.raises(ValueError, match='normalize takes uint8'):
    predictor.normalize(images)
  empty = predictor(images[:0], budget=5)
  assert empty.labels.shape == empty.exits.shape == (0,)


def test_writing_refuses_to_replace_and_checks_the_results(exported,
                                                           tmp_path):
  read = artifact.read_artifact(exported.model)
  results = exported.results
  with pytest.raises(FileExistsError, match='already exists: pass '
                     'overwrite=True'):
    write_artifact(exported.model, read.config, read.variables, results)
  other = tmp_path / 'notes'
  other.mkdir()
  (other / 'keep.txt').write_text('mine')
  with pytest.raises(FileExistsError, match='not a serving artifact; '
                     'refusing to replace it'):
    write_artifact(other, read.config, read.variables, results,
                   overwrite=True)
  assert (other / 'keep.txt').read_text() == 'mine'
  stale = dict(results, params_sha256='0' * 64)
  with pytest.raises(ValueError, match='evaluated on other parameters.*'
                     're-evaluate'):
    write_artifact(tmp_path / 'stale', read.config, read.variables, stale)
  copy = tmp_path / 'copy'
  shutil.copytree(exported.model, copy)
  (copy / 'extra').write_text('from the old artifact')
  write_artifact(copy, read.config, read.variables, results, overwrite=True)
  assert sorted(os.listdir(copy)) == sorted(artifact.ARTIFACT_FILES)
  assert sorted(os.listdir(tmp_path)) == ['copy', 'notes']  # no temp dirs
  assert Predictor.load(copy).params_sha256 == results['params_sha256']


def test_export_errors_are_one_line(exported, tmp_path):
  out = _export(f'--workdir={tmp_path}', f'--out={tmp_path / "model"}',
                f'--config.dataset.data_dir={exported.root / "data"}')
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == (
      f'error: no results.json in {tmp_path}: evaluate first: python -m '
      f'experiments.evaluate --config=<config> --workdir={tmp_path}')
  out = _export(f'--workdir={exported.root / "run"}',
                f'--out={exported.model}',
                f'--config.dataset.data_dir={exported.root / "data"}')
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith(
      f'error: {exported.model} already exists: pass overwrite=True '
      '(--overwrite)')


def test_export_on_a_full_disk_keeps_the_old_artifact(exported, tmp_path):
  """--overwrite with every file limited below the variables' size
  (RLIMIT_FSIZE, as a full disk): one line naming the artifact and the
  room it needs; the old artifact is intact and no temporary is left."""
  old = tmp_path / 'model'
  shutil.copytree(exported.model, old)
  before = sorted((p.name, p.read_bytes()) for p in old.rglob('*')
                  if p.is_file())
  variables = (old / artifact.VARIABLES_FILE).stat().st_size

  def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (variables // 2,) * 2)

  out = subprocess.run(
      [sys.executable, '-m', 'experiments.export',
       '--config=tests/tiny_digits_config.py',
       f'--config.train.num_steps={NUM_STEPS}',
       f'--workdir={exported.root / "run"}', f'--out={old}', '--overwrite',
       '--compilation_cache=none',
       f'--config.dataset.data_dir={exported.root / "data"}'],
      cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True,
      timeout=600, preexec_fn=limit_file_size)
  assert out.returncode == 1
  assert 'Traceback' not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      f'error: cannot write {old} (a file would exceed the size this '
      'process may write (ulimit -f); it needs '
      f'{paths.megabytes(variables)})'), out.stderr
  assert sorted((p.name, p.read_bytes()) for p in old.rglob('*')
                if p.is_file()) == before
  assert sorted(os.listdir(tmp_path)) == ['model']  # no temporary left


def test_imta_predicts_with_simulated_exits(exported, tmp_path):
  """IMTA's network cannot run stage by stage: the predictor computes every
  exit and simulates the exiting, reproducing evaluate_model's results of
  the same (untrained) network."""
  import jax  # pylint: disable=g-import-not-at-top
  from l2w_jax import data  # pylint: disable=g-import-not-at-top
  from l2w_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  from l2w_jax.training.learner import method_model  # pylint: disable=g-import-not-at-top
  config = tiny_train_config('sklearn_digits', method='imta')
  config.dataset.data_dir = exported.config.dataset.data_dir
  model = method_model(config)
  variables = model.init(jax.random.PRNGKey(0), exported.images[:1],
                         train=False)
  results = report.evaluate_model(config, model, variables,
                                  data.data_info(config))
  path = write_artifact(tmp_path / 'imta', config, variables, results)
  predictor = Predictor.load(path, max_batch=MAX_BATCH)
  assert not predictor.uses_cascade
  assert predictor.fallback_reason  # the cascade's own explanation
  for budget in (1, 20, 39):
    out = predictor(exported.images, budget=budget)
    want = results['budgeted'][budget - 1]
    correct = int(np.sum(out.labels == exported.labels))
    assert correct * 100.0 / len(exported.labels) == want['test_top1']
    assert np.bincount(out.exits, minlength=model.num_exits).tolist() == (
        want['test_exit_counts'])
  # Its StableHLO export is the batch program alone, with the same results.
  from l2w_jax.serving import stablehlo  # pylint: disable=g-import-not-at-top
  programs = stablehlo.export_programs(model, variables,
                                       exported.images.shape[1:], ('cpu',))
  assert set(programs) == {'batch'}
  thresholds = np.asarray(predictor.budgets[19].thresholds, np.float32)
  labels, exits = programs['batch'].call(exported.images, thresholds)
  out = predictor(exported.images, budget=20)
  np.testing.assert_array_equal(np.asarray(labels), out.labels)
  np.testing.assert_array_equal(np.asarray(exits), out.exits)
  # Confident nowhere, even at the last exit: everyone leaves there.
  _, exits = programs['batch'].call(
      exported.images[:8], np.full(model.num_exits, np.inf, np.float32))
  assert np.asarray(exits).tolist() == [model.num_exits - 1] * 8
