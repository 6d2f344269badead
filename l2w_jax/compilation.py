"""Compile once per machine: JAX's persistent compilation cache, and what
compilation cost a run.

Every entry point calls `enable_cache` before it compiles anything: the
compiled programs go to one directory shared by all workdirs of the user
(by default `$XDG_CACHE_HOME/l2w_jax/xla`, i.e. `~/.cache/l2w_jax/xla`), so
a second run, a resume or an evaluation of the same config loads its
programs instead of compiling them. `CompileLog` counts, from JAX's own
monitoring events, how many programs a stretch of work compiled, how long
that took, and how many came from the cache.
"""

from __future__ import annotations

import os
import threading

import jax

# Environment variables that choose the directory, in order of precedence
# after an explicit argument (JAX's own variable is honoured too).
ENV_VARS = ('L2W_JAX_COMPILATION_CACHE', 'JAX_COMPILATION_CACHE_DIR')
DISABLED = ('', 'none', 'off')

_BACKEND_COMPILE = '/jax/core/compile/backend_compile_duration'
_CACHE_HIT = '/jax/compilation_cache/cache_hits'
_CACHE_MISS = '/jax/compilation_cache/cache_misses'


def default_directory() -> str:
  """`$XDG_CACHE_HOME/l2w_jax/xla` (`~/.cache/l2w_jax/xla` without it)."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'l2w_jax', 'xla')


def cache_directory(directory: str | None = None) -> str | None:
  """The cache directory to use: `directory`, else the first of ENV_VARS
  that is set, else `default_directory()`; None when it is one of
  DISABLED ('', 'none', 'off')."""
  if directory is None:
    directory = next((os.environ[v] for v in ENV_VARS if v in os.environ),
                     default_directory())
  if directory.strip().lower() in DISABLED:
    return None
  return directory


def enable_cache(directory: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache in `cache_directory(
  directory)` for every program, however fast it compiles (the model's
  initialisation and evaluation programs add up); returns the directory,
  or None if the cache is disabled. Call before compiling anything."""
  directory = cache_directory(directory)
  if directory is None:
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  if '://' not in directory:
    directory = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return directory


def active_directory() -> str | None:
  """The directory JAX's persistent cache uses now (None: off)."""
  if not jax.config.jax_enable_compilation_cache:
    return None
  return jax.config.jax_compilation_cache_dir or None


class CompileLog:
  """Counts the programs compiled while it is active (a context manager),
  from JAX's monitoring events: `programs` backend compilations (each
  either compiled or read from the persistent cache), `cache_hits`,
  `cache_misses`, and `seconds`, the time spent in them."""

  def __init__(self):
    self.programs = 0
    self.cache_hits = 0
    self.cache_misses = 0
    self.seconds = 0.0
    self._lock = threading.Lock()

  def _event(self, event: str, **kwargs) -> None:
    del kwargs
    with self._lock:
      if event == _CACHE_HIT:
        self.cache_hits += 1
      elif event == _CACHE_MISS:
        self.cache_misses += 1

  def _duration(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event == _BACKEND_COMPILE:
      with self._lock:
        self.programs += 1
        self.seconds += duration

  def __enter__(self) -> 'CompileLog':
    jax.monitoring.register_event_listener(self._event)
    jax.monitoring.register_event_duration_secs_listener(self._duration)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_listener(self._event)
    jax.monitoring.unregister_event_duration_listener(self._duration)

  def summary(self) -> dict:
    """{'compile_s', 'programs', 'cache_hits', 'cache_misses'}."""
    return {'compile_s': round(self.seconds, 3), 'programs': self.programs,
            'cache_hits': self.cache_hits,
            'cache_misses': self.cache_misses}

  def describe(self) -> str:
    """One line, e.g. 'compiled 5 programs in 31.2 s (0 from the cache)'."""
    return (f'{self.programs} program(s) in {self.seconds:.1f} s, '
            f'{self.cache_hits} of them from the persistent compilation '
            'cache')
