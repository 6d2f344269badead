"""`sklearn_digits`: the handwritten digits shipped with scikit-learn, as tfds.

`sklearn.datasets.load_digits()` holds 1,797 real 8x8 grey-level digits
(values 0..16, UCI "optdigits", 10 classes), so this dataset needs no
download: it is the small real dataset the demo and the tests train on here.

Each image is upsampled to 32x32 with PIL's bilinear filter (in floating
point, then rounded once), its values scaled from 0..16 to 0..255 and
replicated to three channels, so that the CIFAR MSDNet runs on it unchanged.
The splits are fixed and stratified by class (seed `SPLIT_SEED`):
`train` 70%, `validation` 10% (the held-out threshold split), `test` 20%.
"""

from __future__ import annotations

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

NAME = 'sklearn_digits'
IMAGE_SIZE = 32
NUM_CLASSES = 10
SPLIT_SEED = 0
# Fractions of the 1,797 images; the validation fraction is of the whole set.
TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.1

# Per-channel mean and std of the `train` split (1,257 images) in ToTensor
# units (x / 255), rounded to 4 decimals like the CIFAR constants: numpy mean
# and population std over every pixel of `digit_images(raw)[train]`
# (0.304852, 0.323355); the three channels are equal (greyscale).
MEAN = (0.3049, 0.3049, 0.3049)
STD = (0.3234, 0.3234, 0.3234)


def image_features() -> dict[str, tfds.features.FeatureConnector]:
  """The features every digits dataset has: `image`, uint8 (32, 32, 3),
  and `label`, one of 10 classes."""
  return {
      'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
      'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
  }


def digit_images(raw: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
  """(N, 8, 8) values 0..16 -> uint8 (N, size, size, 3) values 0..255.

  The scaling happens before the resampling, in float32 ('F' mode), so the
  only rounding is the final one to uint8.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  scaled = np.asarray(raw, np.float32) * np.float32(255.0 / 16.0)
  out = np.empty((len(scaled), size, size), np.uint8)
  for i, image in enumerate(scaled):
    big = Image.fromarray(image, mode='F').resize(
        (size, size), resample=Image.Resampling.BILINEAR)
    out[i] = np.clip(np.rint(np.asarray(big)), 0, 255).astype(np.uint8)
  return np.repeat(out[..., None], 3, axis=-1)


def split_indices(labels: np.ndarray,
                  seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
  """Stratified train / validation / test indices into `labels`, each sorted.

  The test set is split off first (20%), then the validation set (10% of the
  whole, i.e. 1/8 of the rest), both with `train_test_split(stratify=...)`.
  """
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top

  everything = np.arange(len(labels))
  rest, test = model_selection.train_test_split(
      everything, test_size=TEST_FRACTION, stratify=labels, random_state=seed)
  train, validation = model_selection.train_test_split(
      rest, test_size=VALIDATION_FRACTION / (1.0 - TEST_FRACTION),
      stratify=labels[rest], random_state=seed)
  return {'train': np.sort(train), 'validation': np.sort(validation),
          'test': np.sort(test)}


def load_raw() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits: (1797, 8, 8) float 0..16 and (1797,) int labels."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  return digits.images, digits.target


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits, upsampled to 32x32x3."""

  VERSION = tfds.core.Version('1.0.0')
  # tfds derives `code_path` (where it looks for checksums.tsv) through
  # `importlib_resources`, which it only declares for Python < 3.9 and which is
  # absent on 3.10+ without it; this builder downloads nothing, so name the
  # file directly.
  code_path = epath.Path(__file__)
  RELEASE_NOTES = {
      '1.0.0': 'Bilinear 32x32 upsampling, stratified 70/10/20 splits '
               f'(seed {SPLIT_SEED}).',
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=(
            "scikit-learn's handwritten digits (load_digits: 1,797 8x8 "
            'images, values 0..16, UCI optdigits test set), bilinearly '
            'upsampled to 32x32, scaled to 0..255 and replicated to 3 '
            'channels. Stratified splits with a fixed seed: train 70%, '
            'validation 10% (held out for early-exit thresholds), test 20%. '
            'Prepared locally, no download.'),
        features=tfds.features.FeaturesDict(image_features()),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/modules/generated/'
                 'sklearn.datasets.load_digits.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    raw, labels = load_raw()
    images = digit_images(raw)
    return {
        split: self._generate_examples(images, labels, indices)
        for split, indices in split_indices(labels).items()
    }

  def _generate_examples(self, images, labels, indices):
    # Keys are the indices into load_digits(); tfds stores the examples in
    # the (deterministic) order of their hashed keys.
    for i in indices:
      yield int(i), {'image': images[i], 'label': int(labels[i])}
