"""Reading PyTorch checkpoints (`.pth.tar` as the original saves them, `.npz`).

The `.pth` round trip needs PyTorch, which the project does not depend on: it
runs wherever torch is installed and is reported SKIPPED elsewhere. The error
that names the missing dependency is tested with torch made unimportable."""

import sys

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2w_jax.convert.torch_state import (flax_to_torch, load_torch_checkpoint,
                                         torch_to_flax, variables_template)
from l2w_jax.models.msdnet import MSDNet
from tests.tiny import TINY_IMAGE, TINY_MSDNET


def _state_dict():
  model = MSDNet(TINY_MSDNET)
  x = jnp.ones((1,) + TINY_IMAGE)
  return model, x, flax_to_torch(model.init(jax.random.PRNGKey(0), x), 3)


def test_npz_checkpoint(tmp_path):
  model, x, state = _state_dict()
  path = tmp_path / 'model.npz'
  np.savez(path, **{f'model/{k}': v for k, v in state.items()},
           **{'meta_net/output_layer.bias': np.zeros(5, np.float32)})
  loaded = load_torch_checkpoint(path)
  assert set(loaded) == {'model', 'meta_net'}
  variables = torch_to_flax(loaded['model'], variables_template(model, x))
  np.testing.assert_array_equal(
      variables['params']['classifier_1']['linear']['kernel'],
      state['classifier.1.linear.weight'].T)


def test_original_style_pth_checkpoint_with_ddp_prefix(tmp_path):
  torch = pytest.importorskip('torch')
  model, x, state = _state_dict()
  checkpoint = {
      'epoch': 100, 'arch': 'msdnet', 'best_prec1': 73.9,
      'state_dict': {f'module.{k}': torch.from_numpy(np.array(v))
                     for k, v in state.items()},
      'meta_state_dict': {'output_layer.bias': torch.zeros(5)},
  }
  path = tmp_path / 'checkpoint.pth.tar'
  torch.save(checkpoint, path)
  loaded = load_torch_checkpoint(path)
  assert set(loaded) == {'model', 'meta_net'}
  assert set(loaded['model']) == set(state)
  for name, value in state.items():
    np.testing.assert_array_equal(loaded['model'][name], value, err_msg=name)
  variables = torch_to_flax(loaded['model'], variables_template(model, x))
  chex.assert_trees_all_equal(
      variables, flax.core.unfreeze(model.init(jax.random.PRNGKey(0), x)))
  np.testing.assert_array_equal(loaded['meta_net']['output_layer.bias'],
                                np.zeros(5, np.float32))


def test_pth_checkpoint_without_torch_names_the_dependency(tmp_path,
                                                           monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)  # import torch fails
  path = tmp_path / 'checkpoint.pth.tar'
  path.write_bytes(b'not read without torch')
  with pytest.raises(ImportError, match='needs PyTorch'):
    load_torch_checkpoint(path)


def test_missing_checkpoint_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint at'):
    load_torch_checkpoint(tmp_path / 'absent.pth')
