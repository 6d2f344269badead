"""A tiny digits experiment for command-line tests."""

from tests.tiny import tiny_train_config


def get_config():
  return tiny_train_config('sklearn_digits', num_steps=3)
