"""Records that cannot be read: found, named and, on request, left out.

A tfds split is a list of TFRecord files. A record can be unreadable in
two ways: its image does not decode (a corrupt JPEG or PNG), or the file
ends inside it (a truncated file, often a copy still being written). tf.data
reports either without saying which file or record; `scan_split` finds
them (on the failure path only: the pipelines read the files as usual
until something fails), and `corrupt_message` says in one line which they
are and how to go on: `config.dataset.skip_corrupt=True` trains without
them, their count in the log and in results.json.

`remember_files` notes the size and modification time of every file of a
prepared dataset the first time this process opens it, so a message can
also name the files that changed since (a dataset re-prepared or copied
over while the run reads it).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re

import tensorflow as tf
import tensorflow_datasets as tfds


SKIP_FIELD = 'dataset.skip_corrupt'
TRUNCATED = 'the file ends before it: truncated'


class CorruptRecordError(RuntimeError):
  """A record of the dataset cannot be read; the message names it and the
  option that skips such records."""


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """One unreadable record.

  Attributes:
    file: the TFRecord file (its full path or URL).
    record: the record's index in the file, from 0.
    position: its position in the split in tfds's unshuffled order (the
      index of its row when the split is loaded whole).
    reason: what is wrong, in words.
  """
  file: str
  record: int
  position: int
  reason: str

  def describe(self) -> str:
    return f'record {self.record} of {self.file} ({self.reason})'


def _readable_records(filename: str, limit: int) -> int:
  """How many whole records `filename` has, up to `limit` (a truncated file
  ends with a partial one)."""
  count = 0
  try:
    for _ in tf.data.TFRecordDataset(filename).take(limit):
      count += 1
  except tf.errors.DataLossError:
    pass
  return count


def decoder_complaint(error: Exception) -> str:
  """What a decoder said about a record, in one short line."""
  text = getattr(error, 'message', None) or str(error)
  # Without TF's node and op names.
  text = re.sub(r'\{\{[^}]*\}\}|\[\[[^]]*\]\]|\[Op:.*', '', text)
  text = ' '.join(text.split()) or type(error).__name__
  return 'it does not decode: ' + text[:160]


def _why_not(features, serialized: bytes) -> str:
  """`decoder_complaint` about one serialized record."""
  try:
    features.deserialize_example(tf.constant(serialized))
  except (tf.errors.OpError, ValueError) as e:
    return decoder_complaint(e)
  return 'it does not decode'


def truncated_records(builder: tfds.core.DatasetBuilder,
                      split: str) -> list[BadRecord]:
  """The records of a split (any tfds split string, e.g. a process's share)
  that its files end before, read from each file's start (position -1)."""
  bad = []
  for instruction in builder.info.splits[split].file_instructions:
    end = instruction.skip + instruction.take
    readable = _readable_records(instruction.filename, end)
    bad += [BadRecord(instruction.filename, i, -1, TRUNCATED)
            for i in range(max(readable, instruction.skip), end)]
  return bad


def scan_split(builder: tfds.core.DatasetBuilder,
               split: str) -> list[BadRecord]:
  """Reads and decodes every record of a prepared tfds split; returns those
  that cannot be read.

  Args:
    builder: the prepared builder.
    split: a tfds split name ('train', 'test', ...), whole.

  Returns:
    The unreadable records, in tfds's unshuffled order.
  """
  features = builder.info.features
  bad = []
  first = 0  # the position in the split of the file's first record
  for instruction in builder.info.splits[split].file_instructions:
    filename, skip, take = (instruction.filename, instruction.skip,
                            instruction.take)
    whole = max(_readable_records(filename, skip + take) - skip, 0)
    records = (tf.data.TFRecordDataset(filename).take(skip + whole)
               .skip(skip).enumerate())
    # Records that decode pass; ignore_errors drops the others (the reads
    # stop before a truncated tail, where ignore_errors would spin). The
    # decoded features are fetched, not just awaited: tf.data prunes a
    # decode that no output needs.
    decoded = records.map(
        lambda i, serialized: (i, features.deserialize_example(serialized)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    good = {int(i) for i, _ in decoded.ignore_errors().as_numpy_iterator()}
    failed = [i for i in range(whole) if i not in good]
    if failed:
      raw = {int(i): serialized for i, serialized in
             records.as_numpy_iterator() if int(i) in failed}
      bad += [BadRecord(filename, skip + i, first + i,
                        _why_not(features, raw[i])) for i in failed]
    bad += [BadRecord(filename, skip + i, first + i, TRUNCATED)
            for i in range(whole, take)]
    first += take
  return bad


def records_around(builder: tfds.core.DatasetBuilder, split: str,
                   bad: list[BadRecord]) -> tf.data.Dataset:
  """The split's readable records, decoded, in tfds's unshuffled order,
  without the `bad` ones (`scan_split`'s)."""
  features = builder.info.features
  left_out = {(record.file, record.record) for record in bad}
  parts = []
  for instruction in builder.info.splits[split].file_instructions:
    filename, skip, take = (instruction.filename, instruction.skip,
                            instruction.take)
    dropped = sorted(r for f, r in left_out if f == filename)
    # Stop before a dropped tail: a truncated file ends in it.
    stop = skip + take
    while stop - 1 in dropped:
      stop -= 1
    kept = tf.data.TFRecordDataset(filename).take(stop)
    dropped = tf.constant(dropped or [-1], tf.int64)
    kept = kept.enumerate().skip(skip).filter(
        lambda i, _: tf.logical_not(tf.reduce_any(tf.equal(i, dropped))))
    parts.append(kept.map(lambda _, serialized:
                          features.deserialize_example(serialized)))
  records = parts[0]
  for part in parts[1:]:
    records = records.concatenate(part)
  return records


# ------------------------------------------------------------------ files

_FILES_AT_START: dict[str, dict[str, tuple[int, int]]] = {}


def _file_stats(data_dir: str) -> dict[str, tuple[int, int]]:
  """{file name: (bytes, modification time in ns)} of a prepared
  dataset's directory."""
  stats = {}
  for name in tf.io.gfile.listdir(data_dir):
    path = os.path.join(data_dir, name)
    try:
      stat = tf.io.gfile.stat(path)
    except tf.errors.NotFoundError:
      continue
    if not stat.is_directory:
      stats[name] = (int(stat.length), int(stat.mtime_nsec))
  return stats


def remember_files(builder: tfds.core.DatasetBuilder) -> None:
  """Notes the files of `builder`'s prepared directory the first time this
  process opens it."""
  data_dir = os.fspath(builder.data_dir)
  if data_dir not in _FILES_AT_START:
    try:
      _FILES_AT_START[data_dir] = _file_stats(data_dir)
    except tf.errors.OpError:
      pass  # not prepared (yet), or mocked: nothing to compare with


def forget_files() -> None:
  """Forgets what `remember_files` noted (tests that rewrite datasets)."""
  _FILES_AT_START.clear()


def _when(nanoseconds: int) -> str:
  moment = datetime.datetime.fromtimestamp(nanoseconds / 1e9,
                                           datetime.timezone.utc)
  return moment.strftime('%Y-%m-%d %H:%M:%S UTC')


def changed_files(builder: tfds.core.DatasetBuilder) -> list[str]:
  """The files of `builder`'s directory that differ from what
  `remember_files` noted, each in words (name, what changed)."""
  data_dir = os.fspath(builder.data_dir)
  before = _FILES_AT_START.get(data_dir)
  if before is None:
    return []
  try:
    now = _file_stats(data_dir)
  except tf.errors.OpError:
    return [f'{data_dir} (no longer readable)']
  changes = []
  for name in sorted(set(before) | set(now)):
    old, new = before.get(name), now.get(name)
    if old == new:
      continue
    if old is None:
      changes.append(f'{name} (new)')
    elif new is None:
      changes.append(f'{name} (removed)')
    elif old[0] != new[0]:
      changes.append(f'{name} ({old[0]} -> {new[0]} bytes)')
    else:
      changes.append(f'{name} (modified {_when(new[1])})')
  return changes


def corrupt_message(dataset: str, bad: list[BadRecord],
                    builder: tfds.core.DatasetBuilder,
                    can_skip: bool = True) -> str:
  """The one line a run stops with: which records, what changed, what to
  do (`can_skip`: whether config.dataset.skip_corrupt would get past
  them)."""
  shown = '; '.join(record.describe() for record in bad[:3])
  more = f' and {len(bad) - 3} more' if len(bad) > 3 else ''
  records = 'a record' if len(bad) == 1 else f'{len(bad)} records'
  line = f'dataset {dataset!r}: {records} cannot be read: {shown}{more}. '
  if can_skip:
    line += (f'Set --config.{SKIP_FIELD}=True to train without such records '
             '(they are counted in the log and in results.json)')
  else:
    line += ('A streaming dataset cannot step over a truncated file: restore '
             'the file (or prepare the dataset again)')
  changes = changed_files(builder)
  if changes:
    shown = ', '.join(changes[:3]) + (f' and {len(changes) - 3} more'
                                      if len(changes) > 3 else '')
    line += ('; ' if not can_skip else ', or restore the dataset: ') + (
        f'files in {builder.data_dir} changed since this process started: '
        f'{shown}')
  return line
