"""Accuracy against MFLOPs figures (budgeted curve, exits marked)."""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from l2w_jax import paths  # pylint: disable=g-import-not-at-top,wrong-import-position
from l2w_jax.meta.weighting import NUM_BUDGETS  # pylint: disable=g-import-not-at-top,wrong-import-position


@dataclasses.dataclass
class Curve:
  """One run: its budgeted curve and its exits (anytime accuracies)."""
  label: str
  budget_mflops: Sequence[float]
  budget_top1: Sequence[float]
  exit_mflops: Sequence[float]
  exit_top1: Sequence[float]


def curve_from_results(results: dict, label: str) -> Curve:
  """A Curve from a results.json dict."""
  rows = sorted(results['budgeted'], key=lambda r: r['mflops'])
  return Curve(label=label,
               budget_mflops=[r['mflops'] for r in rows],
               budget_top1=[r['test_top1'] for r in rows],
               exit_mflops=results['mflops_per_exit'],
               exit_top1=results['anytime']['top1'])


def plot_budgeted(curves: Sequence[Curve], path: str, title: str = '') -> None:
  """Writes a publication-style PNG (or PDF, by extension) of the curves."""
  fig, ax = plt.subplots(figsize=(5.2, 3.9), dpi=200)
  markers = ('o', 's', '^', 'D', 'v', 'P')
  for i, curve in enumerate(curves):
    line, = ax.plot(curve.budget_mflops, curve.budget_top1, '-', lw=1.8,
                    label=f'{curve.label} (budgeted)')
    ax.plot(curve.exit_mflops, curve.exit_top1, markers[i % len(markers)],
            ms=5.5, mfc='white', mec=line.get_color(), mew=1.5,
            label=f'{curve.label} (exits)')
    if len(curves) == 1:
      for k, (x, y) in enumerate(zip(curve.exit_mflops, curve.exit_top1)):
        ax.annotate(f'exit {k + 1}', (x, y), textcoords='offset points',
                    xytext=(4, -11), fontsize=7, color=line.get_color())
  ys = [y for c in curves for y in list(c.budget_top1) + list(c.exit_top1)]
  xs = [x for c in curves for x in list(c.budget_mflops) + list(c.exit_mflops)]
  low, high = min(ys), max(ys)
  pad = max(0.1 * (high - low), 0.5)
  ax.set_ylim(low - 2 * pad, min(100.0, high + pad) + pad / 2)
  span = max(xs) - min(xs)
  ax.set_xlim(min(xs) - 0.05 * span, max(xs) + 0.08 * span)
  _finish(fig, ax, path, 'top-1 accuracy (%)', title, 'best')


def _frame(ax) -> None:
  """The house style of an axis: a light grid, no top or right spine."""
  ax.grid(True, alpha=0.3, lw=0.6)
  for side in ('top', 'right'):
    ax.spines[side].set_visible(False)


def _write(fig, path: str) -> None:
  """Renders `fig` in memory in the format of `path`'s extension (PNG if
  none) and writes it to `path`, a local path or a gs:// URL, in one
  piece (`paths.write_atomic`); closes it."""
  extension = os.path.splitext(path)[1][1:].lower()
  buffer = io.BytesIO()
  try:
    fig.savefig(buffer, format=extension or None)
  finally:
    plt.close(fig)
  paths.write_atomic(path, buffer.getvalue())


def _save(fig, path: str, title: str) -> None:
  """A multi-panel figure's title (if any), layout, file and closing."""
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  _write(fig, path)


def _finish(fig, ax, path: str, ylabel: str, title: str,
            legend_loc: str) -> None:
  """Labels, grid, legend and frame of an accuracy-MFLOPs figure; saves it
  to `path` and closes it."""
  ax.set_xlabel('average MFLOPs per image')
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title, fontsize=10)
  ax.legend(fontsize=7, loc=legend_loc, frameon=False)
  _frame(ax)
  fig.tight_layout()
  _write(fig, path)


def plot_seed_summaries(summaries, path: str, title: str = '') -> None:
  """Mean budgeted curve of each method with a band of ± one standard
  deviation over seeds, and its exits (mean ± std as error bars); one PNG
  (or PDF). `summaries` are `comparison.SeedSummary`s."""
  fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=200)
  markers = ('o', 's', '^', 'D', 'v', 'P', 'X', '*')
  colors = plt.get_cmap('tab10').colors
  for i, s in enumerate(summaries):
    order = sorted(range(len(s.budget_mflops)),
                   key=lambda j: s.budget_mflops[j])
    x = [s.budget_mflops[j] for j in order]
    y = [s.budget_top1[j] for j in order]
    spread = [s.budget_top1_std[j] for j in order]
    line, = ax.plot(x, y, '-', lw=1.5, color=colors[i % len(colors)],
                    label=f'{s.label} (n={s.num_seeds})')
    ax.fill_between(x, [a - b for a, b in zip(y, spread)],
                    [a + b for a, b in zip(y, spread)],
                    color=line.get_color(), alpha=0.15, lw=0)
    ax.errorbar(s.exit_mflops, s.exit_top1, yerr=s.exit_top1_std,
                fmt=markers[i % len(markers)], ms=4.5, mfc='white',
                mec=line.get_color(), ecolor=line.get_color(), mew=1.2,
                capsize=2, lw=0.8)
  _finish(fig, ax, path, 'top-1 accuracy (%), mean ± std over seeds', title,
          'lower right')


def plot_method_comparison(runs: Sequence[tuple[str, dict]], path: str,
                           budget_index: int, title: str = '') -> None:
  """The demo's figure: three panels for runs [(label, results.json dict)]
  of one config (same exits): (a) budgeted top-1 against average MFLOPs,
  exits marked; (b) anytime top-1 of each exit; (c) the share of test
  images leaving at each exit at budget `budget_index` (1..39), with that
  budget's MFLOPs and top-1 per run in the legend. One PNG (or PDF)."""
  fig, axes = plt.subplots(1, 3, figsize=(13.0, 3.9), dpi=160,
                           gridspec_kw={'width_ratios': (1.25, 1.0, 1.0)})
  colors = plt.get_cmap('tab10').colors
  markers = ('o', 's', '^', 'D')
  ax = axes[0]
  for i, (label, results) in enumerate(runs):
    curve = curve_from_results(results, label)
    ax.plot(curve.budget_mflops, curve.budget_top1, '-', lw=1.8,
            color=colors[i], label=f'{label} (budgeted)')
    ax.plot(curve.exit_mflops, curve.exit_top1, markers[i % 4], ms=5.5,
            mfc='white', mec=colors[i], mew=1.5, label=f'{label} (exits)')
  ax.set_xlabel('average MFLOPs per image')
  ax.set_ylabel('test top-1 (%)')
  ax.set_title('(a) budgeted batch classification', fontsize=9)
  ax.legend(fontsize=7, loc='lower right', frameon=False)

  ax = axes[1]
  num_exits = len(runs[0][1]['anytime']['top1'])
  exits = list(range(1, num_exits + 1))
  for i, (label, results) in enumerate(runs):
    ax.plot(exits, results['anytime']['top1'], '-' + markers[i % 4],
            color=colors[i], ms=5, mfc='white', mew=1.5, label=label)
  mflops = runs[0][1]['mflops_per_exit']
  ax.set_xticks(exits, [f'{k}\n{m:.2f}' for k, m in zip(exits, mflops)],
                fontsize=7)
  ax.set_xlabel('exit (MFLOPs)')
  ax.set_ylabel('test top-1 (%)')
  ax.set_title('(b) anytime prediction: every image to exit k', fontsize=9)
  ax.legend(fontsize=7, loc='lower right', frameon=False)

  ax = axes[2]
  width = 0.8 / len(runs)
  for i, (label, results) in enumerate(runs):
    row = next(r for r in results['budgeted']
               if r['budget_index'] == budget_index)
    counts = row['test_exit_counts']
    share = [100.0 * c / sum(counts) for c in counts]
    ax.bar([k + (i - (len(runs) - 1) / 2) * width for k in exits], share,
           width * 0.95, color=colors[i],
           label=f"{label}: {row['mflops']:.2f} MFLOPs, "
                 f"{row['test_top1']:.1f} %")
  ax.set_xticks(exits, [str(k) for k in exits])
  ax.set_xlabel('exit')
  ax.set_ylabel('test images leaving here (%)')
  ax.set_title(f'(c) where images exit at budget {budget_index} of '
               f'{NUM_BUDGETS}',
               fontsize=9)
  ax.legend(fontsize=7, loc='upper right', frameon=False)
  for ax in axes:
    _frame(ax)
  _save(fig, path, title)


def plot_exit_return_times(mflops_per_exit: Sequence[float],
                           single_ms: Sequence[float], full_single_ms: float,
                           batch_ms: Sequence[float], full_batch_ms: float,
                           batch_size: int, path: str,
                           title: str = '') -> None:
  """Two panels: the milliseconds per image until exit k returns, one image
  at a time (left) and in batches of `batch_size` (right), each against
  the full network (every block and exit) as a dashed line; the x axis is
  each exit's MFLOPs. One PNG (or PDF)."""
  fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6), dpi=160)
  labels = [f'exit {k + 1}\n{m:.1f} MFLOPs'
            for k, m in enumerate(mflops_per_exit)]
  panels = ((axes[0], single_ms, full_single_ms, 'one image at a time'),
            (axes[1], batch_ms, full_batch_ms, f'batches of {batch_size}'))
  for ax, exit_ms, full_ms, name in panels:
    positions = range(len(exit_ms))
    bars = ax.bar(positions, exit_ms, width=0.6, color='tab:blue',
                  alpha=0.8, label='cascade: return at this exit')
    for bar, value in zip(bars, exit_ms):
      ax.annotate(f'{value:.2f}', (bar.get_x() + bar.get_width() / 2, value),
                  textcoords='offset points', xytext=(0, 2), ha='center',
                  fontsize=7)
    ax.axhline(full_ms, color='tab:red', ls='--', lw=1.2,
               label=f'full network: {full_ms:.2f} ms')
    ax.plot(positions, [full_ms * m / mflops_per_exit[-1]
                        for m in mflops_per_exit], '_', ms=22, mew=2,
            color='black', label='full network x MFLOPs share')
    ax.set_xticks(list(positions), labels, fontsize=7)
    ax.set_ylabel('ms per image')
    ax.set_title(name, fontsize=9)
    ax.set_ylim(0, 1.5 * max(max(exit_ms), full_ms))  # room for the legend
    ax.legend(fontsize=7, loc='upper left', frameon=False)
    _frame(ax)
  _save(fig, path, title)
