"""The examples run (reduced: a few iterations)."""

import importlib.util

import numpy as np

from tests.conftest import PROJECT_ROOT


def _load(name: str):
  spec = importlib.util.spec_from_file_location(
      name, PROJECT_ROOT / 'examples' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_custom_weight_net_example_trains_with_its_own_pieces(tmp_path):
  example = _load('custom_weight_net')
  summary = example.train(steps=2, data_dir=str(tmp_path / 'data'))
  assert summary['steps'] == 2
  assert len(summary['test_top1_per_exit']) == 4
  assert np.isfinite(summary['meta_loss']) and summary['meta_loss'] > 0
  weights = summary['mean_weight_per_exit']
  # The new net's weights lie in (0, 2) and already differ between exits.
  assert all(0 < w < 2 for w in weights) and len(set(weights)) == 4
