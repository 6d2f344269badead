"""Metric writers (TensorBoard, JSON lines, logging) and the console progress line."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

from clu import metric_writers
import numpy as np

from l2w_jax import paths

METRICS_FILE = 'metrics.jsonl'


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per `write_scalars` call: {"step": s, ...}.

  Args:
    path: the file, a local path or a gs:// URL (`paths.append_text`).
  """

  def __init__(self, path: str):
    self._path = path
    paths.makedirs(paths.split(path)[0])

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {'step': int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    paths.append_text(self._path, json.dumps(row) + '\n')

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_hparams(self, hparams):
    paths.append_text(self._path,
                      json.dumps({'hparams': _jsonable(hparams)}) + '\n')

  def flush(self):
    pass

  def close(self):
    pass


def _jsonable(value):
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  return str(value)


def create_writer(workdir: str, *, write_to_disk: bool = True
                  ) -> metric_writers.MetricWriter:
  """TensorBoard events + metrics.jsonl in `workdir` (only on process 0);
  `workdir` may be a gs:// URL (tf.summary writes those natively)."""
  if not write_to_disk:
    return metric_writers.LoggingWriter()
  return metric_writers.MultiWriter([
      metric_writers.SummaryWriter(paths.join(workdir, 'tensorboard')),
      JsonlWriter(paths.join(workdir, METRICS_FILE)),
  ])


_IMPORTED = time.time()


def process_seconds() -> float:
  """Seconds since this process started: from /proc on Linux (to 0.01 s),
  elsewhere since this module was imported (which misses the interpreter's
  start-up and the imports before it)."""
  try:
    with open('/proc/self/stat') as f:
      # Field 22, after the command name in parentheses: start time in
      # clock ticks since boot.
      start_ticks = int(f.read().rsplit(')', 1)[1].split()[19])
    with open('/proc/uptime') as f:
      uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError):
    return time.time() - _IMPORTED


def format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m'
  if minutes:
    return f'{minutes}m{seconds:02d}s'
  return f'{seconds}s'


class Progress:
  """Rate and ETA from the steps done in this process."""

  def __init__(self, first_step: int, total_steps: int):
    self._first = first_step
    self._total = total_steps
    self._start = time.perf_counter()

  def line(self, step: int, scalars: Mapping[str, float]) -> str:
    elapsed = time.perf_counter() - self._start
    done = step - self._first
    eta = elapsed / done * (self._total - step) if done else float('nan')
    parts = [f'step {step}/{self._total}']
    for key, label in (('epoch', 'epoch'), ('train/loss', 'loss'),
                       ('train/meta_loss', 'meta'),
                       ('train/acc_last', 'acc(last)'),
                       ('train/images_per_second', 'img/s')):
      if key in scalars:
        value = scalars[key]
        parts.append(f'{label} {value:.4g}' if key != 'epoch' else
                     f'{label} {int(value)}')
    if done and np.isfinite(eta):
      parts.append(f'ETA {format_duration(eta)}')
    return ' | '.join(parts)


def weight_statistics(moments) -> dict[str, list[float]]:
  """`step.weight_moments` (5, K), averaged -> per exit 'mean', 'std' and
  'loss_corr' (Pearson's correlation of weight and loss; None where either
  does not vary)."""
  m = np.asarray(moments, np.float64)
  mean_w, mean_l = m[0], m[2]
  var_w = np.maximum(m[1] - mean_w ** 2, 0.0)
  var_l = np.maximum(m[3] - mean_l ** 2, 0.0)
  cov = m[4] - mean_w * mean_l
  scale = np.sqrt(var_w * var_l)
  # Float32 moments: spreads below ~1e-6 of the mean are rounding.
  varies = ((var_w > 1e-12 * np.maximum(mean_w ** 2, 1e-12)) &
            (var_l > 1e-12 * np.maximum(mean_l ** 2, 1e-12)))
  return {'mean': [float(x) for x in mean_w],
          'std': [float(x) for x in np.sqrt(var_w)],
          'loss_corr': [float(np.clip(c / s, -1, 1)) if v else None
                        for c, s, v in zip(cov, scale, varies)]}
