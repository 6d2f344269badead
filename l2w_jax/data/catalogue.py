"""The datasets the pipelines serve: names, classes, stored sizes, the
original's normalisation constants, default holdouts and augmentations."""

from __future__ import annotations

import dataclasses

from l2w_jax.data import digits
from l2w_jax.data import graded_digits


DATASETS = ('sklearn_digits', 'graded_digits', 'cifar10', 'cifar100',
            'cifar100_lt', 'imagenet2012')
AUGMENTS = ('crop_flip', 'crop', 'none', 'imagenet')
# 'thresholds': the training images thresholds are searched on under
# eval.protocol=train (all, or eval.threshold_images of them).
EVAL_SPLITS = ('holdout', 'test', 'train', 'thresholds')

# Normalisation constants of the original (MSDNet's CIFAR values, torchvision's
# ImageNet ones); the embedded digits: see `digits.MEAN`,
# `graded_digits.MEAN`.
CIFAR10_MEAN = (0.4914, 0.4824, 0.4467)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CROP_PADDING = 4  # RandomCrop(32, padding=4)
IMAGENET_EVAL_RATIO = 256 / 224  # Resize(256) before CenterCrop(224)


class DatasetNotFoundError(RuntimeError):
  """The dataset is not prepared where tfds looks; the message says how."""


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """Sizes of a dataset as the pipelines serve it.

  Attributes:
    name: config.dataset.name.
    num_classes: number of labels.
    image_shape: (H, W, 3) of the model input.
    num_train: images the training epochs draw from (all processes together),
      after removing the holdout and the long-tail subsampling.
    num_holdout: images held out of training (0 if none).
    num_test: images of the test split.
    num_thresholds: training images the 'thresholds' split serves (all of
      them, or eval.threshold_images).
    skipped: the records left out as unreadable (config.dataset.skip_corrupt),
      each in words (`records.BadRecord.describe`); the sizes above count
      without them.
  """
  name: str
  num_classes: int
  image_shape: tuple
  num_train: int
  num_holdout: int
  num_test: int
  num_thresholds: int = 0
  skipped: tuple = ()


@dataclasses.dataclass(frozen=True)
class DatasetKind:
  """What is fixed per dataset name."""
  tfds_name: str
  num_classes: int
  image_size: int  # stored size (in memory) or the usual model input (ImageNet)
  mean: tuple
  std: tuple
  augment: str
  holdout: int  # held out under eval.protocol=holdout (MSDNet's --use-valid)
  streaming: bool
  # Prepared here on first use, with its own fixed train / validation (the
  # holdout) / test splits: the datasets built from scikit-learn's digits.
  embedded: bool = False
  # The tfds split the test images come from (ImageNet: its validation set).
  test_split: str = 'test'
  # Training on the long-tailed subset of 'train' (`splits.long_tail_indices`
  # at dataset.imbalance_factor).
  long_tailed: bool = False
  # tfds prepares it from files the user downloads (their names, for the
  # message that says how); empty: tfds downloads it.
  manual_files: tuple[str, ...] = ()


KINDS = {
    'sklearn_digits': DatasetKind(digits.NAME, 10, 32, digits.MEAN,
                                  digits.STD, 'crop', 0, False,
                                  embedded=True),
    'graded_digits': DatasetKind(graded_digits.NAME, 10, 32,
                                 graded_digits.MEAN, graded_digits.STD,
                                 'crop', 0, False, embedded=True),
    'cifar10': DatasetKind('cifar10', 10, 32, CIFAR10_MEAN, CIFAR10_STD,
                           'crop_flip', 5000, False),
    'cifar100': DatasetKind('cifar100', 100, 32, CIFAR100_MEAN, CIFAR100_STD,
                            'crop_flip', 5000, False),
    # Under eval.protocol=holdout: 1,000 of the 10,847 images of the
    # imbalance-100 pool (5,000 would be half of it).
    'cifar100_lt': DatasetKind('cifar100', 100, 32, CIFAR100_MEAN,
                               CIFAR100_STD, 'crop_flip', 1000, False,
                               long_tailed=True),
    'imagenet2012': DatasetKind('imagenet2012', 1000, 224, IMAGENET_MEAN,
                                IMAGENET_STD, 'imagenet', 50000, True,
                                test_split='validation',
                                manual_files=('ILSVRC2012_img_train.tar',
                                              'ILSVRC2012_img_val.tar')),
}
