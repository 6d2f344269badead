"""The evaluations of a training run: the periodic one on the held-out (or
test) split, and the final anytime and budgeted evaluation in
results.json."""

from __future__ import annotations

import jax

from l2w_jax import parallel
from l2w_jax.evaluation import report
from l2w_jax.training import registry


def write_eval(writer, step, statistics, state, config, info) -> None:
  split = 'holdout' if info.num_holdout else 'test'
  outputs = statistics.outputs(config, {'params': state.params,
                                        'batch_stats': state.batch_stats},
                               split)
  scalars = {}
  for k, (top1, top5, loss) in enumerate(zip(
      outputs.top1_accuracy(), outputs.top5_accuracy(),
      outputs.mean_loss())):
    scalars[f'val/acc_exit{k + 1}'] = float(top1)
    scalars[f'val/top5_exit{k + 1}'] = float(top5)
    scalars[f'val/loss_exit{k + 1}'] = float(loss)
  writer.write_scalars(step, scalars)
  accs = ' '.join(f'{a:.1f}' for a in outputs.top1_accuracy())
  print(f'  {split} top-1 per exit: {accs}', flush=True)


def final_evaluation(config, workdir, learner, state, info, statistics=None,
                     layout: parallel.BatchLayout | None = None,
                     plan: tuple[registry.Phase, ...] = (),
                     startup: dict | None = None) -> dict:
  """Anytime and 39-budget evaluation; writes results.json and the plot
  (process 0 only)."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  results = report.evaluate_model(config, learner.model, variables, info,
                                  statistics)
  results['iterations'] = int(state.step)
  results.update(startup or {})
  if plan:
    results['phases'] = [{'name': p.name, 'start': p.start,
                          'length': p.length} for p in plan]
  if layout is not None:
    results.update(num_devices=layout.num_devices,
                   num_processes=layout.num_processes,
                   per_device_batch=layout.per_device_batch,
                   global_batch=layout.global_batch)
  if jax.process_index() == 0:
    report.write_results(results, workdir, config.method.upper(),
                         f'{info.name}: budgeted batch classification')
  return results
