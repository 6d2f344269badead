"""Metric writers (TensorBoard, JSON lines, logging) and the console progress line."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

from clu import metric_writers
import numpy as np

METRICS_FILE = 'metrics.jsonl'


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per `write_scalars` call: {"step": s, ...}."""

  def __init__(self, path: str):
    self._path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {'step': int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    with open(self._path, 'a') as f:
      f.write(json.dumps(row) + '\n')

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
    with open(self._path, 'a') as f:
      f.write(json.dumps({'hparams': _jsonable(hparams)}) + '\n')

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
  """TensorBoard events + metrics.jsonl in `workdir` (only on process 0)."""
  if not write_to_disk:
    return metric_writers.LoggingWriter()
  return metric_writers.MultiWriter([
      metric_writers.SummaryWriter(os.path.join(workdir, 'tensorboard')),
      JsonlWriter(os.path.join(workdir, METRICS_FILE)),
  ])


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
