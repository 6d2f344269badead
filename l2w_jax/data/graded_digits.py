"""`graded_digits`: scikit-learn's digits made hard in graded, known amounts.

The 1,797 digits of `sklearn.datasets.load_digits()` are so easy that every
exit of a small MSDNet scores ~99 %. This dataset renders each of them
`VARIANTS` times on a 32x32 canvas, each rendering with its own severity
s ~ U(0, 1): at s = 0 the digit is large, upright, centred and clean; as s
grows it shrinks, rotates, moves off-centre and loses contrast, a second
digit of another class is drawn over it ever more strongly (the label stays
the first digit's), a grey block covers part of the canvas and Gaussian
noise is added. Easy samples are solved by the first exit; hard ones need
deeper features, which is what an early-exit network is for. Every
rendering keeps its severity as a feature, so evaluation can ask which
exits the hard samples take.

Construction (all fixed; `RELEASE_NOTES` gives the version):
  * Splits are by source digit: `digits.split_indices` (stratified, seed 0)
    splits the 1,797 sources 70/10/20 into train / validation (the held-out
    threshold split) / test; every rendering of a source stays in its split,
    and a distractor is always another source of the same split.
  * Rendering j of source i (j = 0..VARIANTS-1) draws from a numpy
    Generator seeded (RENDER_SEED, i, j): the severity, the geometry, the
    distractor, the block and the noise (see `render_one`).
  * Output: uint8 (32, 32, 3) (grey replicated), label, severity (float32),
    source index (int) and variant (int).
"""

from __future__ import annotations

import dataclasses

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from l2w_jax.data import digits
# The canvas of the digits dataset.
from l2w_jax.data.digits import IMAGE_SIZE

NAME = 'graded_digits'
VARIANTS = 3
RENDER_SEED = 2022

# Per-channel mean and std of the `train` split in ToTensor units (x / 255),
# rounded to 4 decimals: numpy mean and population std over every pixel of
# `render_split` of the train sources (checked by tests/test_data.py).
MEAN = (0.1261, 0.1261, 0.1261)
STD = (0.2180, 0.2180, 0.2180)


@dataclasses.dataclass(frozen=True)
class Severity:
  """How each corruption grows with the severity s in [0, 1]."""
  size: tuple = (24.0, 14.0)      # digit height in px at s = 0 and s = 1
  max_angle: float = 50.0         # degrees, times s
  max_shift: float = 6.0          # px off the centre, times s
  contrast: float = 0.3           # the digit's intensity is 1 - contrast * s
  # The second digit is smaller and fainter than the first, so the label is
  # always decidable: `distractor_size` of its size, `distractor` * s of
  # its intensity.
  distractor_size: float = 0.75
  distractor: float = 0.6
  block: float = 8.0              # side in px of the grey block, times s
  noise: float = 25.0             # std of the Gaussian noise (0..255), times s


SEVERITY = Severity()


def _draw(glyph: np.ndarray, size: float, angle: float, centre: tuple,
          canvas: int = IMAGE_SIZE) -> np.ndarray:
  """An 8x8 float glyph (0..255) drawn on a float (canvas, canvas) image:
  scaled to `size` px high, rotated by `angle` degrees about its centre,
  centred at `centre` (x, y in px); bilinear."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  scale = size / 8.0
  theta = np.deg2rad(angle)
  cos, sin = np.cos(theta) / scale, np.sin(theta) / scale
  cx, cy = centre
  # PIL's affine maps each output pixel (x, y) to the input pixel
  # (a x + b y + c, d x + e y + f): the inverse of scale-rotate-translate.
  a, b, d, e = cos, sin, -sin, cos
  c = 4.0 - a * cx - b * cy
  f = 4.0 - d * cx - e * cy
  image = Image.fromarray(np.asarray(glyph, np.float32), mode='F')
  drawn = image.transform((canvas, canvas), Image.Transform.AFFINE,
                          data=(a, b, c, d, e, f),
                          resample=Image.Resampling.BILINEAR, fillcolor=0.0)
  return np.asarray(drawn, np.float32)


def render_one(glyph: np.ndarray, distractor: np.ndarray,
               rng: np.random.Generator,
               severity: Severity = SEVERITY) -> tuple[np.ndarray, float]:
  """One rendering: (uint8 (32, 32) image, severity s).

  `glyph` and `distractor` are 8x8 float digits (0..16). Draws, in order:
  s ~ U(0, 1); the digit's angle, shift and size; the distractor's angle and
  centre; the block's corner; the noise.
  """
  s = float(rng.uniform())
  half = IMAGE_SIZE / 2.0
  size = severity.size[0] + (severity.size[1] - severity.size[0]) * s
  angle = rng.uniform(-1.0, 1.0) * severity.max_angle * s
  shift = rng.uniform(-1.0, 1.0, 2) * severity.max_shift * s
  intensity = 1.0 - severity.contrast * s
  image = intensity * _draw(glyph * (255.0 / 16.0), size, angle,
                            (half + shift[0], half + shift[1]))
  other_angle = rng.uniform(-1.0, 1.0) * severity.max_angle
  other_centre = half + rng.uniform(-1.0, 1.0, 2) * 8.0
  other = _draw(distractor * (255.0 / 16.0), severity.distractor_size * size,
                other_angle, tuple(other_centre))
  image = np.maximum(image, severity.distractor * s * intensity * other)
  side = int(round(severity.block * s))
  corner = rng.integers(0, IMAGE_SIZE - side + 1, 2)
  if side:
    image[corner[1]:corner[1] + side, corner[0]:corner[0] + side] = 128.0
  image = image + rng.normal(size=image.shape) * severity.noise * s
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), s


def render_split(raw: np.ndarray, labels: np.ndarray,
                 sources: np.ndarray) -> dict[str, np.ndarray]:
  """Every rendering of `sources` (indices into load_digits, one split).

  Returns {'image': uint8 (N, 32, 32, 3), 'label': int64 (N,), 'severity':
  float32 (N,), 'source': int64 (N,), 'variant': int64 (N,)}, N =
  VARIANTS * len(sources), ordered by (source, variant). A rendering's
  distractor is a source of the same split with another label, chosen by
  its own generator.
  """
  out = {key: [] for key in ('image', 'label', 'severity', 'source',
                             'variant')}
  sources = np.asarray(sources)
  for i in sources:
    candidates = sources[labels[sources] != labels[i]]
    for j in range(VARIANTS):
      rng = np.random.default_rng((RENDER_SEED, int(i), j))
      other = int(candidates[rng.integers(len(candidates))])
      image, s = render_one(raw[i], raw[other], rng)
      out['image'].append(np.repeat(image[..., None], 3, axis=-1))
      out['label'].append(int(labels[i]))
      out['severity'].append(s)
      out['source'].append(int(i))
      out['variant'].append(j)
  return {'image': np.stack(out['image']),
          'label': np.asarray(out['label'], np.int64),
          'severity': np.asarray(out['severity'], np.float32),
          'source': np.asarray(out['source'], np.int64),
          'variant': np.asarray(out['variant'], np.int64)}


def render_all() -> dict[str, dict[str, np.ndarray]]:
  """{'train', 'validation', 'test'} -> `render_split` of that split."""
  raw, labels = digits.load_raw()
  return {split: render_split(raw, labels, indices)
          for split, indices in digits.split_indices(labels).items()}


class GradedDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's digits rendered with graded corruptions, 32x32x3."""

  VERSION = tfds.core.Version('1.0.0')
  code_path = epath.Path(__file__)  # see digits.SklearnDigits.code_path
  RELEASE_NOTES = {
      '1.0.0': f'{VARIANTS} renderings per source digit, severities U(0, 1) '
               f'(seed {RENDER_SEED}); splits of sklearn_digits.',
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=(
            "scikit-learn's 1,797 handwritten digits, each rendered "
            f'{VARIANTS} times on a 32x32 canvas with a per-rendering '
            'severity s ~ U(0, 1): smaller, rotated, shifted, fainter, '
            'overdrawn by a digit of another class, partly covered and noisy '
            'as s grows. Splits by source digit (stratified 70/10/20, seed '
            '0). Prepared locally, no download.'),
        features=tfds.features.FeaturesDict({
            **digits.image_features(),
            'severity': tfds.features.Scalar(np.float32),
            'source': tfds.features.Scalar(np.int64),
            'variant': tfds.features.Scalar(np.int64),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(rendered)
            for split, rendered in render_all().items()}

  def _generate_examples(self, rendered):
    for n in range(len(rendered['label'])):
      key = int(rendered['source'][n]) * VARIANTS + int(rendered['variant'][n])
      yield key, {field: values[n] for field, values in rendered.items()}
