r"""ImageNet preprocessing per image, now and before issue 25.

  python -m benchmarks.input_pipeline --threads=1 [--images_dir=DIR]

Times, on the same images in the same run, the training input's
preprocessing as the loop runs it now (`train`: the RandomResizedCrop
window alone decoded, PIL's bilinear resize to 224, flip, uint8 out: what
`data.train_stream` computes for each ImageNet image) against the path it
replaced (`train_before`: the whole JPEG decoded, TensorFlow's antialiased
resize, flip, ToTensor + Normalize to float32), with the steps in between
(`train_full_decode`: now but decoding whole images; `train_before_uint8`:
before without the normalisation; `train_tf_resize`: the window decoded
but TensorFlow's resize), and the evaluation transform (decode, Resize(256),
CenterCrop(224)) now (PIL, uint8) and before (TensorFlow, float32).

The images are the JPEG (or PNG) files in --images_dir (the first
--num_images in name order), or --num_images synthetic photos written to a
temporary directory: --width x --height (500 x 375, ImageNet's most common
size; every other one portrait), smooth colour gradients plus noise so that
they compress like photographs, PIL's JPEG at quality 90 with 4:2:0 chroma
(ImageNet's usual encoding). The encoded bytes are held in memory (no disk
reads are timed) and run through a tf.data pipeline (map, batch of
--batch_size, read as numpy, as the training loop does) restricted to
--threads threads: a private pool of that size with single-threaded ops, as
`tfds_source.tf_data_options` sets it. After one warm-up pass, --repeats passes of
every variant alternate, and the median pass time over the images is the
figure: at --threads=1 the cost per image of one thread; with more threads,
wall time per image (throughput). The machine is shared: compare figures
within one run.

Prints one JSON line: `train_ms_per_image`, `train_before_ms_per_image`,
`train_speedup` (before / now), the intermediate variants' times,
`eval_ms_per_image`, `eval_before_ms_per_image`, `train_pixels_equal`
(whether the window decode and the full decode gave the same images),
`tf_resize_max_difference` and `tf_resize_pixels_differing` (TensorFlow's
resize against PIL's on the same windows), `threads`, `num_images`,
`mean_kb` (encoded size) and the settings.
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
from l2w_jax.data import catalogue

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
  resize = int(round(size * catalogue.IMAGENET_EVAL_RATIO))
  mean, std = catalogue.IMAGENET_MEAN, catalogue.IMAGENET_STD

  def train(jpeg_decode):
    def fn(image, index):
      # The pipeline's seed layout: (epoch key, position).
      seed = tf.stack([tf.constant(7, tf.int64), index])
      return augment.imagenet_train_encoded(image, seed, size, jpeg_decode)
    return fn

  def train_before(decode_window, normalise):
    """The training transform before this project's issue 25, or with only
    its decode changed: TensorFlow's antialiased resize of the window of
    the whole decoded image (`decode_window=False`) or of the window alone;
    float32 normalised (as batches then crossed the link) or uint8."""
    def fn(image, index):
      seed = tf.stack([tf.constant(7, tf.int64), index])
      crop_seed, flip_seed = tf.unstack(
          tf.random.experimental.stateless_split(seed, 2))

      def window_of_jpeg():
        shape = tf.io.extract_jpeg_shape(image, output_type=tf.int32)
        window = augment.random_resized_crop_window(crop_seed, shape[0],
                                                    shape[1])
        return augment.decode_crop_jpeg(image, window, shape[1])

      def window_of_decoded():
        decoded = augment.decode_image(image)
        shape = tf.shape(decoded)
        top, left, h, w = tf.unstack(augment.random_resized_crop_window(
            crop_seed, shape[0], shape[1]))
        return tf.slice(decoded, tf.stack([top, left, 0]),
                        tf.stack([h, w, 3]))

      crop = (tf.cond(tf.io.is_jpeg(image), window_of_jpeg,
                      window_of_decoded) if decode_window else
              window_of_decoded())
      out = augment.random_flip(augment.resize_bilinear(crop, size, size),
                                flip_seed)
      return augment.to_float_normalized(out, mean, std) if normalise else out
    return fn

  def evaluate(resize_fn, normalise):
    def fn(image, index):
      del index
      decoded = augment.decode_image(image)
      shape = tf.shape(decoded)
      short = tf.minimum(shape[0], shape[1])
      long = tf.maximum(shape[0], shape[1])
      new_long = tf.cast(tf.floor(resize * tf.cast(long, tf.float64) /
                                  tf.cast(short, tf.float64)), tf.int32)
      new_h = tf.where(shape[0] <= shape[1], resize, new_long)
      new_w = tf.where(shape[0] <= shape[1], new_long, resize)
      out = augment.center_crop(resize_fn(decoded, new_h, new_w), size)
      return augment.to_float_normalized(out, mean, std) if normalise else out
    return fn

  variants = {
      # What data.train_stream / eval_batches(as_bytes=True) compute now.
      'train': train('crop'),
      'train_full_decode': train('full'),
      'train_before': train_before(decode_window=False, normalise=True),
      'train_before_uint8': train_before(decode_window=False,
                                         normalise=False),
      'train_tf_resize': train_before(decode_window=True, normalise=False),
      'eval': evaluate(augment.resize_like_pil, normalise=False),
      'eval_before': evaluate(augment.resize_bilinear, normalise=True),
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

  def images(name):
    return np.concatenate(list(pipeline_of(variants[name],
                                           False).as_numpy_iterator()))

  # Both decodes must give the same images (one pass each, not timed); how
  # far TensorFlow's resize is from PIL's.
  now = images('train')
  pixels_equal = bool(np.array_equal(now, images('train_full_decode')))
  tf_resized = images('train_tf_resize').astype(np.int16)
  resize_difference = np.abs(tf_resized - now)
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
  ms = {name: round(1e3 * statistics.median(t) / per_pass, 3)
        for name, t in times.items()}
  # From the printed times, to 4 significant digits (3 decimals of a small
  # ratio disagreed with the printed times by more than 1%).
  speedup = float(f"{ms['train_before'] / ms['train']:.4g}")
  print(json.dumps({
      'train_ms_per_image': ms['train'],
      'train_before_ms_per_image': ms['train_before'],
      'train_speedup': speedup,
      'train_full_decode_ms_per_image': ms['train_full_decode'],
      'train_before_uint8_ms_per_image': ms['train_before_uint8'],
      'train_tf_resize_ms_per_image': ms['train_tf_resize'],
      'eval_ms_per_image': ms['eval'],
      'eval_before_ms_per_image': ms['eval_before'],
      'train_pixels_equal': pixels_equal,
      'tf_resize_max_difference': int(resize_difference.max()),
      'tf_resize_pixels_differing': round(
          float((resize_difference > 0).mean()), 4),
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
