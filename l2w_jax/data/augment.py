"""torchvision's transforms of the original, as stateless TensorFlow ops.

Every random choice comes from a `tf.random.stateless_*` op with an explicit
seed (a (2,) int64 tensor), never from TensorFlow's global random state, so
the same seed gives the same image in any process and run. Images are uint8
HWC (or NHWC for the batched crop) until `to_float_normalized`, which is
torchvision's ToTensor (x / 255) followed by Normalize((x - mean) / std), in
that order and in float32, as the original computes it.

ImageNet's images (RandomResizedCrop, Resize) are resized by PIL itself
(`resize_like_pil`, a `tf.numpy_function`; PIL releases the GIL while it
resamples), as torchvision does on the PIL images of the original's loader:
the same pixels, and about half the time of TensorFlow's antialiased
resize. Batches of the small datasets, resized only for test models, use
`resize_bilinear`: TensorFlow's antialiased bilinear filter, within one grey
level of PIL's fixed-point arithmetic.

JPEGs are decoded by libjpeg with its accurate integer IDCT (`JDCT_ISLOW`,
TensorFlow's `dct_method='INTEGER_ACCURATE'`), which is what PIL uses: the
same pixels as the original's loader. For RandomResizedCrop only the crop
window is decoded (`decode_random_resized_crop`): the same window, the same
pixels (see `decode_crop_jpeg` for why that holds). That saves less than the
window's share of the image suggests: libjpeg still entropy-decodes every
row down to the window's bottom, and every column of those rows (measured
on 100 KB photos: a window of the left half costs as much as the whole
image, the top half about half); see benchmarks/input_pipeline.py.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image
import tensorflow as tf

# RandomResizedCrop's defaults in torchvision.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10


def to_float_normalized(images: tf.Tensor, mean: Sequence[float],
                        std: Sequence[float]) -> tf.Tensor:
  """uint8 (..., C) -> float32 (..., C): ToTensor then Normalize(mean, std)."""
  x = tf.cast(images, tf.float32) / 255.0
  return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


# ----------------------------------------------------------------------------
# CIFAR: RandomCrop(size, padding) + RandomHorizontalFlip(), batched.


def crop_flip_params(seed: tf.Tensor, num: int, padding: int,
                     flip: bool) -> tf.Tensor:
  """Random crop offsets and flips for `num` images: int32 (num, 3).

  Columns: top and left offsets of the crop in the zero-padded image, each
  uniform in 0..2*padding (RandomCrop's `randint(0, h + 2p - h + 1)`), and 1
  where the image is mirrored (probability 1/2; always 0 when `flip` is
  False). Row i is a function of (seed, i) only: the ops are counter based
  (Philox), so a table drawn for a whole epoch can be sliced anywhere.
  """
  offset_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  offsets = tf.random.stateless_uniform(
      [num, 2], seed=offset_seed, minval=0, maxval=2 * padding + 1,
      dtype=tf.int32)
  if flip:
    flips = tf.cast(
        tf.random.stateless_uniform([num], seed=flip_seed) < 0.5, tf.int32)
  else:
    flips = tf.zeros([num], tf.int32)
  return tf.concat([offsets, flips[:, None]], axis=1)


def crop_flip(images: tf.Tensor, params: tf.Tensor, padding: int) -> tf.Tensor:
  """Crops (and mirrors) a batch as RandomCrop(padding) + RandomHorizontalFlip.

  Args:
    images: uint8 (B, H, W, C).
    params: int32 (B, 3) from `crop_flip_params`: top, left, flip.
    padding: zero padding on every side before the crop (torchvision's
      `padding=4`, `fill=0`, `padding_mode='constant'`).

  Returns:
    uint8 (B, H, W, C): out[b, i, j] = padded[b, top + i, left + j'] with
    j' = W - 1 - j when flipped, else j. One gather for the whole batch.
  """
  shape = tf.shape(images)
  batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
  padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding],
                           [0, 0]])
  padded_width = width + 2 * padding
  rows = params[:, 0:1] + tf.range(height)[None, :]  # (B, H)
  cols = params[:, 1:2] + tf.range(width)[None, :]  # (B, W)
  cols = tf.where(params[:, 2:3] > 0, tf.reverse(cols, axis=[1]), cols)
  flat = rows[:, :, None] * padded_width + cols[:, None, :]  # (B, H, W)
  pixels = tf.reshape(padded, [batch, -1, channels])
  out = tf.gather(pixels, tf.reshape(flat, [batch, -1]), axis=1, batch_dims=1)
  return tf.reshape(out, shape)


# ----------------------------------------------------------------------------
# ImageNet: RandomResizedCrop + RandomHorizontalFlip; Resize + CenterCrop.


def resize_bilinear(image: tf.Tensor, height, width) -> tf.Tensor:
  """uint8 (H, W, C) or (N, H, W, C) -> uint8 (..., height, width, C):
  TensorFlow's antialiased bilinear resize, within a grey level of PIL's."""
  resized = tf.image.resize(image, tf.stack([height, width]),
                            method='bilinear', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def _pil_resize(image: np.ndarray, height, width) -> np.ndarray:
  return np.asarray(Image.fromarray(image).resize(
      (int(width), int(height)), Image.Resampling.BILINEAR))


def resize_like_pil(image: tf.Tensor, height, width) -> tf.Tensor:
  """PIL's `Image.resize((width, height), BILINEAR)` of one image.

  Args:
    image: uint8 (H, W, 3).
    height, width: the output size (int or int32 scalar tensors).

  Returns:
    uint8 (height, width, 3): torchvision's Resize / RandomResizedCrop of
    the PIL image, pixel for pixel (it is PIL's code).
  """
  resized = tf.numpy_function(_pil_resize, [image, height, width], tf.uint8,
                              stateful=False)
  static = [tf.get_static_value(height), tf.get_static_value(width), 3]
  resized.set_shape([None if d is None else int(d) for d in static])
  return resized


def random_resized_crop_window(
    seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor,
    scale: Sequence[float] = CROP_SCALE, ratio: Sequence[float] = CROP_RATIO,
    attempts: int = CROP_ATTEMPTS) -> tf.Tensor:
  """torchvision's `RandomResizedCrop.get_params`: int32 (4,) top, left, h, w.

  Up to `attempts` tries, each drawing an area fraction uniform in `scale`
  and an aspect ratio log-uniform in `ratio`, w = round(sqrt(area * r)),
  h = round(sqrt(area / r)) (round half to even, as Python's `round`), and
  offsets uniform over the positions where the crop fits; the first try that
  fits wins. Otherwise the whole image, center-cropped to the nearest ratio
  in range. All tries are drawn at once and the first fitting one is picked,
  which is the same rule as the loop.
  """
  area_seed, ratio_seed, offset_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  h_f = tf.cast(height, tf.float64)
  w_f = tf.cast(width, tf.float64)
  target_area = h_f * w_f * tf.cast(tf.random.stateless_uniform(
      [attempts], seed=area_seed, minval=scale[0], maxval=scale[1]),
                                    tf.float64)
  log_ratio = tf.random.stateless_uniform(
      [attempts], seed=ratio_seed, minval=math.log(ratio[0]),
      maxval=math.log(ratio[1]))
  aspect = tf.exp(tf.cast(log_ratio, tf.float64))
  crop_w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  crop_h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
  # randint(0, n) for n = height - h + 1 positions (and likewise for width).
  u = tf.cast(tf.random.stateless_uniform([attempts, 2], seed=offset_seed),
              tf.float64)
  spans = tf.stack([height - crop_h + 1, width - crop_w + 1], axis=1)
  offsets = tf.minimum(
      tf.cast(tf.floor(u * tf.cast(tf.maximum(spans, 1), tf.float64)),
              tf.int32), tf.maximum(spans - 1, 0))
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  sampled = tf.stack([offsets[first, 0], offsets[first, 1], crop_h[first],
                      crop_w[first]])

  # Fallback: central crop of the whole image, clipped to the ratio range.
  in_ratio = w_f / h_f
  min_ratio, max_ratio = min(ratio), max(ratio)
  fallback_w = tf.where(
      in_ratio > max_ratio,
      tf.cast(tf.round(h_f * max_ratio), tf.int32), width)
  fallback_h = tf.where(
      in_ratio < min_ratio,
      tf.cast(tf.round(w_f / min_ratio), tf.int32), height)
  fallback = tf.stack([(height - fallback_h) // 2, (width - fallback_w) // 2,
                       fallback_h, fallback_w])
  return tf.where(tf.reduce_any(fits), sampled, fallback)


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor,
                        size: int) -> tf.Tensor:
  """RandomResizedCrop(size): uint8 (H, W, 3) -> uint8 (size, size, 3)."""
  shape = tf.shape(image)
  top, left, crop_h, crop_w = tf.unstack(
      random_resized_crop_window(seed, shape[0], shape[1]))
  crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([crop_h, crop_w,
                                                             -1]))
  return resize_like_pil(crop, size, size)


# ----------------------------------------------------------------------------
# Decoding: whole images, or only the RandomResizedCrop window of a JPEG.

JPEG_DECODES = ('crop', 'full')

# Columns decoded on each side of a crop window (clipped to the image). With
# chroma subsampled 2:1 horizontally (4:2:0, 4:2:2: nearly every ImageNet
# photo) libjpeg's "fancy" upsampling interpolates each pixel's chroma with
# the neighbouring chroma sample; a cropped decode treats the window's edge
# columns as image edges and replicates instead, which changes the last
# column of the window (and the first one when the window starts on an iMCU
# boundary) by up to ~15 grey levels. One more column on each side puts
# that neighbour inside the decoded region. Rows need nothing:
# libjpeg-turbo's jpeg_skip_scanlines keeps the vertical upsampling context.
JPEG_CROP_MARGIN = 1
# Columns decoded at least (all if the image is narrower). A region 2 px
# wide at the left edge of a 4:2:0 JPEG decoded differently in the tests
# (libjpeg upsamples a component of at most 2 chroma samples without the
# interpolation); every region 3 px wide or more was exact. Decoding works
# in 16 px iMCUs anyway, so one iMCU costs nothing.
JPEG_CROP_MIN_WIDTH = 16


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """An encoded JPEG (or PNG, or GIF's first frame) -> uint8 (H, W, 3).

  INTEGER_ACCURATE is libjpeg's ISLOW, what PIL decodes with: the same
  pixels as the original's loader. Greyscale is replicated to 3 channels and
  CMYK converted to RGB (tfds's imagenet2012 stores its 22 CMYK files and
  its one PNG re-encoded as RGB JPEGs, the others as they came); TensorFlow's
  decode_jpeg also decodes PNG and GIF (not BMP), so a stray PNG works too.
  """
  return tf.io.decode_jpeg(encoded, channels=3, dct_method='INTEGER_ACCURATE')


def decode_crop_jpeg(encoded: tf.Tensor, window: tf.Tensor,
                     width: tf.Tensor | None = None) -> tf.Tensor:
  """decode_image(encoded)[top:top + h, left:left + w], decoding little more.

  Args:
    encoded: scalar string, a JPEG (baseline or progressive; greyscale, YCbCr
      with any chroma subsampling, or CMYK).
    window: int32 (4,): top, left, h, w, inside the image.
    width: the image's width if known (int32 scalar), else read from the
      header.

  Returns:
    uint8 (h, w, 3), pixel for pixel what the full decode gives in the window
    (tested on 4:4:4, 4:2:2 and 4:2:0 chroma, progressive, greyscale and CMYK
    files of odd sizes). A plain `decode_and_crop_jpeg` of the window would
    differ in its edge columns (see `JPEG_CROP_MARGIN`), so the window is
    widened by the margin (and to `JPEG_CROP_MIN_WIDTH`), decoded, and
    sliced.
  """
  if width is None:
    width = tf.io.extract_jpeg_shape(encoded, output_type=tf.int32)[1]
  top, left, crop_h, crop_w = tf.unstack(window)
  wide_left = tf.maximum(left - JPEG_CROP_MARGIN, 0)
  wide_right = tf.minimum(
      tf.maximum(left + crop_w + JPEG_CROP_MARGIN,
                 wide_left + JPEG_CROP_MIN_WIDTH), width)
  wide_left = tf.maximum(
      tf.minimum(wide_left, wide_right - JPEG_CROP_MIN_WIDTH), 0)
  wide = tf.io.decode_and_crop_jpeg(
      encoded, tf.stack([top, wide_left, crop_h, wide_right - wide_left]),
      channels=3, dct_method='INTEGER_ACCURATE')
  return tf.slice(wide, tf.stack([0, left - wide_left, 0]),
                  tf.stack([crop_h, crop_w, 3]))


def decode_random_resized_crop(encoded: tf.Tensor, seed: tf.Tensor,
                               size: int) -> tf.Tensor:
  """`random_resized_crop(decode_image(encoded), seed, size)`, decoding less.

  A JPEG's size is read from its header (`extract_jpeg_shape`), the window
  drawn from it with the same seed (`random_resized_crop_window`), and only
  that window decoded (`decode_crop_jpeg`): the same pixels in the same
  window, then the same resize. Anything else (a PNG, say) is decoded whole
  and cropped.

  Args:
    encoded: scalar string, the encoded image.
    seed: int64 (2,), the crop's stateless seed.
    size: the output side.

  Returns:
    uint8 (size, size, 3).
  """

  def jpeg():
    shape = tf.io.extract_jpeg_shape(encoded, output_type=tf.int32)
    window = random_resized_crop_window(seed, shape[0], shape[1])
    crop = decode_crop_jpeg(encoded, window, shape[1])
    return resize_like_pil(crop, size, size)

  def other():
    return random_resized_crop(decode_image(encoded), seed, size)

  return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """RandomHorizontalFlip(p=0.5) of one (H, W, C) image."""
  flip = tf.random.stateless_uniform([], seed=seed) < 0.5
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
  """torchvision Resize(size): the shorter side becomes `size`, the longer
  int(size * long / short) (truncated, as torchvision computes it)."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  short = tf.minimum(height, width)
  long = tf.maximum(height, width)
  new_long = tf.cast(
      tf.floor(size * tf.cast(long, tf.float64) / tf.cast(short, tf.float64)),
      tf.int32)
  new_h = tf.where(height <= width, size, new_long)
  new_w = tf.where(height <= width, new_long, size)
  return resize_like_pil(image, new_h, new_w)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """torchvision CenterCrop(size) of an image at least `size` on each side:
  top = round((H - size) / 2), left likewise (round half to even)."""
  shape = tf.shape(image)
  top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float64) / 2.0),
                tf.int32)
  left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float64) / 2.0),
                 tf.int32)
  return tf.slice(image, tf.stack([top, left, 0]), [size, size, -1])


def imagenet_train(image: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
  """RandomResizedCrop(size) + RandomHorizontalFlip: uint8 -> uint8."""
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  return random_flip(random_resized_crop(image, crop_seed, size), flip_seed)


def imagenet_train_encoded(encoded: tf.Tensor, seed: tf.Tensor, size: int,
                           jpeg_decode: str = 'crop') -> tf.Tensor:
  """Decode + RandomResizedCrop(size) + RandomHorizontalFlip.

  Args:
    encoded: scalar string, the encoded image.
    seed: int64 (2,), the example's stateless seed.
    size: the output side.
    jpeg_decode: 'crop' decodes only the crop window of a JPEG
      (`decode_random_resized_crop`); 'full' decodes the whole image first.
      Both give the same pixels.

  Returns:
    uint8 (size, size, 3), equal to `imagenet_train(decode_image(encoded),
    seed, size)`.
  """
  if jpeg_decode == 'full':
    return imagenet_train(decode_image(encoded), seed, size)
  if jpeg_decode != 'crop':
    raise ValueError(f'jpeg_decode must be one of {JPEG_DECODES}, got '
                     f'{jpeg_decode!r}')
  # The same split of the seed as imagenet_train: the same window and flip.
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  return random_flip(decode_random_resized_crop(encoded, crop_seed, size),
                     flip_seed)


def imagenet_eval(image: tf.Tensor, size: int, resize: int) -> tf.Tensor:
  """Resize(resize) + CenterCrop(size): uint8 (H, W, 3) -> (size, size, 3)."""
  return center_crop(resize_shorter_side(image, resize), size)
