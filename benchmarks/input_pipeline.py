r"""ImageNet preprocessing per image: cropped JPEG decoding against full.

  python -m benchmarks.input_pipeline --threads=1 [--images_dir=DIR]

Times the training input's preprocessing (decode, RandomResizedCrop(224),
flip, ToTensor + Normalize to float32: what `data.train_batches` and
`data.train_stream` compute for each ImageNet image) two ways on the same
images in the same run: decoding only the crop window (`jpeg_decode='crop'`,
the default: `augment.decode_random_resized_crop`) and decoding the whole
JPEG before cropping (`jpeg_decode='full'`); and the evaluation transform
(decode, Resize(256), CenterCrop(224), normalise). Each also without the
normalisation (uint8 out), to show what emitting uint8 would save.

The images are the JPEG (or PNG) files in --images_dir (the first
--num_images in name order), or --num_images synthetic photos written to a
temporary directory: --width x --height (500 x 375, ImageNet's most common
size; every other one portrait), smooth colour gradients plus noise so that
they compress like photographs, PIL's JPEG at quality 90 with 4:2:0 chroma
(ImageNet's usual encoding). The encoded bytes are held in memory (no disk
reads are timed) and run through a tf.data pipeline (map, batch of
--batch_size, read as numpy, as the training loop does) restricted to
--threads threads: a private pool of that size with single-threaded ops, as
`pipeline._options` sets it. After one warm-up pass, --repeats passes of
every variant alternate, and the median pass time over the images is the
figure: at --threads=1 the cost per image of one thread; with more threads,
wall time per image (throughput). The machine is shared: compare figures
within one run.

Prints one JSON line: `train_ms_per_image` (cropped decode),
`train_full_decode_ms_per_image`, `train_speedup` (their ratio),
`train_uint8_ms_per_image`, `eval_ms_per_image`, `eval_uint8_ms_per_image`,
`train_pixels_equal` (whether both decodes gave the same uint8 images),
`threads`, `num_images`, `mean_kb` (encoded size) and the settings.
"""

import json
import os
import statistics
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image
import tensorflow as tf

from l2w_jax.data import augment
from l2w_jax.data import pipeline

_THREADS = flags.DEFINE_integer('threads', 1, 'Threads of the tf.data pool.')
_IMAGES_DIR = flags.DEFINE_string(
    'images_dir', None, 'A directory of JPEG (or PNG) files; synthetic '
    'photos when unset.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 64, 'Images timed.')
_WIDTH = flags.DEFINE_integer('width', 500, 'Synthetic images: width.')
_HEIGHT = flags.DEFINE_integer('height', 375, 'Synthetic images: height.')
_QUALITY = flags.DEFINE_integer('quality', 90, 'Synthetic images: JPEG '
                                'quality.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Model input side.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Images per batch.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed passes per variant.')

_EXTENSIONS = ('.jpg', '.jpeg', '.png')


def synthetic_photo(height: int, width: int,
                    rng: np.random.Generator) -> np.ndarray:
  """uint8 (height, width, 3) that compresses like a photograph.

  A smooth colour wave per channel (the gradients of sky and walls), plus
  textures at four scales (Gaussian grids of 32, 12, 5 and 2 px cells,
  upsampled bicubically, partly shared between channels as luminance
  detail is in photos), plus pixel noise (sigma 10). At quality 90, a
  500 x 375 image takes about 100 KB, ImageNet's average file size, where
  plain Gaussian noise on gradients gives 50-60 KB.
  """
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  image = np.empty((height, width, 3), np.float32)
  for c in range(3):
    angle, phase = rng.uniform(0, np.pi, 2)
    period = rng.uniform(80, 300)
    image[..., c] = 128 + 50 * np.sin(
        (x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period + phase)

  def texture(grid):
    return np.asarray(Image.fromarray(grid).resize((width, height),
                                                   Image.BICUBIC))

  for cell, amplitude in ((32, 40), (12, 30), (5, 30), (2, 36)):
    grid = rng.normal(0, 1, (height // cell + 2, width // cell + 2, 3))
    grid = grid.astype(np.float32)
    shared = texture(grid[..., 0])
    for c in range(3):
      image[..., c] += amplitude * (0.7 * shared +
                                    0.3 * texture(grid[..., c]))
  image += rng.normal(0.0, 10.0, image.shape)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def write_synthetic(directory: str, num: int, width: int, height: int,
                    quality: int) -> None:
  """`num` synthetic JPEGs in `directory`, every other one portrait."""
  rng = np.random.default_rng(0)
  for i in range(num):
    h, w = (height, width) if i % 2 == 0 else (width, height)
    Image.fromarray(synthetic_photo(h, w, rng)).save(
        os.path.join(directory, f'{i:05d}.JPEG'), 'JPEG', quality=quality)


def read_images(directory: str, num: int) -> list:
  """The encoded bytes of the first `num` image files in `directory`."""
  names = sorted(n for n in os.listdir(directory)
                 if n.lower().endswith(_EXTENSIONS))[:num]
  if not names:
    raise app.UsageError(f'no JPEG or PNG files in {directory}')
  encoded = []
  for name in names:
    with open(os.path.join(directory, name), 'rb') as f:
      encoded.append(f.read())
  return encoded


def main(argv):
  del argv
  threads = _THREADS.value
  # Before TensorFlow starts: its own op pools as small as the pipeline's.
  tf.config.threading.set_inter_op_parallelism_threads(threads)
  tf.config.threading.set_intra_op_parallelism_threads(threads)

  if _IMAGES_DIR.value:
    source = _IMAGES_DIR.value
    encoded = read_images(source, _NUM_IMAGES.value)
  else:
    source = (f'synthetic {_WIDTH.value}x{_HEIGHT.value} JPEG q'
              f'{_QUALITY.value}')
    with tempfile.TemporaryDirectory() as directory:
      write_synthetic(directory, _NUM_IMAGES.value, _WIDTH.value,
                      _HEIGHT.value, _QUALITY.value)
      encoded = read_images(directory, _NUM_IMAGES.value)
  size = _IMAGE_SIZE.value
  resize = int(round(size * pipeline.IMAGENET_EVAL_RATIO))
  mean, std = pipeline.IMAGENET_MEAN, pipeline.IMAGENET_STD

  def train(jpeg_decode, normalise):
    def fn(image, index):
      # The pipeline's seed layout: (epoch key, position).
      seed = tf.stack([tf.constant(7, tf.int64), index])
      out = augment.imagenet_train_encoded(image, seed, size, jpeg_decode)
      return augment.to_float_normalized(out, mean, std) if normalise else out
    return fn

  def evaluate(normalise):
    def fn(image, index):
      del index
      out = augment.imagenet_eval(augment.decode_image(image), size, resize)
      return augment.to_float_normalized(out, mean, std) if normalise else out
    return fn

  variants = {
      'train': train('crop', True),
      'train_full_decode': train('full', True),
      'train_uint8': train('crop', False),
      'train_full_decode_uint8': train('full', False),
      'eval': evaluate(True),
      'eval_uint8': evaluate(False),
  }
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  source_ds = tf.data.Dataset.from_tensor_slices(
      (tf.constant(encoded, tf.string),
       tf.range(len(encoded), dtype=tf.int64)))

  def pipeline_of(fn, repeat):
    ds = source_ds.repeat() if repeat else source_ds
    # No prefetch: a pipeline runs ahead only by the map's `threads`
    # elements in flight, so it hardly works while another is timed.
    ds = ds.map(fn, num_parallel_calls=threads).batch(_BATCH.value)
    return ds.with_options(options)

  # Both decodes must give the same images (one pass each, not timed).
  pixels_equal = all(
      np.array_equal(a, b) for a, b in zip(
          pipeline_of(variants['train_uint8'], False).as_numpy_iterator(),
          pipeline_of(variants['train_full_decode_uint8'],
                      False).as_numpy_iterator(), strict=True))
  # Steady state: one iterator per variant for the whole run (creating one
  # instantiates and optimises its functions, which would cost more than
  # the images on a small set).
  iterators = {name: pipeline_of(fn, True).as_numpy_iterator()
               for name, fn in variants.items()}
  batches = max(1, len(encoded) // _BATCH.value)
  per_pass = batches * _BATCH.value
  for iterator in iterators.values():  # warm-up: one pass each
    for _ in range(batches):
      next(iterator)
  times = {name: [] for name in iterators}
  for _ in range(_REPEATS.value):
    for name, iterator in iterators.items():
      next(iterator)  # lets the previous variant's elements in flight end
      start = time.perf_counter()
      for _ in range(batches):
        next(iterator)
      times[name].append(time.perf_counter() - start)
  ms = {name: 1e3 * statistics.median(t) / per_pass
        for name, t in times.items()}
  print(json.dumps({
      'train_ms_per_image': round(ms['train'], 3),
      'train_full_decode_ms_per_image': round(ms['train_full_decode'], 3),
      'train_speedup': round(ms['train_full_decode'] / ms['train'], 3),
      'train_uint8_ms_per_image': round(ms['train_uint8'], 3),
      'train_full_decode_uint8_ms_per_image': round(
          ms['train_full_decode_uint8'], 3),
      'eval_ms_per_image': round(ms['eval'], 3),
      'eval_uint8_ms_per_image': round(ms['eval_uint8'], 3),
      'train_pixels_equal': bool(pixels_equal),
      'threads': threads,
      'num_images': len(encoded),
      'images_per_pass': per_pass,
      'mean_kb': round(sum(map(len, encoded)) / len(encoded) / 1024, 1),
      'image_size': size,
      'batch_size': _BATCH.value,
      'repeats': _REPEATS.value,
      'source': source,
  }))


if __name__ == '__main__':
  app.run(main)
