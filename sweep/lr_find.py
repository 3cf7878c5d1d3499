"""The learning-rate range test, in two forms: one ramped run, or a grid of short runs.

    import sweep
    from sweep.lr_find import lr_find
    found = lr_find(cfg)               # the grid form: num_it fixed rates trained at once
    found.suggestion                   # the 'valley' rule's learning rate
    found.suggestions                  # {'valley': ..., 'steep': ..., 'minimum': ...}
    found.plot()                       # a matplotlib Axes

- `method='ramp'` is the classic test (Smith 2015, "Cyclical learning rates for training
  neural networks"; fastai's `lr_find`): one run whose learning rate grows by a constant
  factor every step from `start_lr` to `end_lr`, recording the batch loss, smoothed by a
  bias-corrected exponential moving average, and stopped once the smoothed loss exceeds
  `stop_factor` (4) times its best. It is one jitted `lax.scan`.
- `method='grid'` is this engine's own form: `num_it` fixed learning rates, log-spaced over
  the same range, each trained from the same start for a short fixed budget of updates, all
  at once with `sweep.run`. The loss after the budget is a deterministic function of the
  learning rate (every run sees the same initial parameters and data order), so the curve
  has no batch noise; a smoothing spline in log learning rate is fitted to it before the
  rules are applied.

The suggestion rules are fastai's and serve both forms: `valley`, `steep`, `minimum`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kernels import optimizers, train
from sweep import engine
from sweep.config import SweepConfig, validate
from sweep.errors import config_error
from sweep.expansion import run_fields

__all__ = ['METHODS', 'RULES', 'LRFinderResult', 'lr_find', 'minimum', 'steep', 'valley']

METHODS = ('grid', 'ramp')


# ------------------------------------------------------------------------ rules ----


LR_FIND_CSV = 'lr_find.csv'
LR_FIND_JSON = 'lr_find.json'


def _json_number(v: Any) -> float | None:
  f = float(v)
  return f if math.isfinite(f) else None


def _check_curve(lrs: Any, losses: Any) -> tuple[np.ndarray, np.ndarray]:
  lrs = np.asarray(lrs, np.float64).reshape(-1)
  losses = np.asarray(losses, np.float64).reshape(-1)
  if lrs.shape != losses.shape or len(lrs) < 2:
    raise ValueError(
      f'a rule needs at least two (lr, loss) points of equal count; got {lrs.shape} and '
      f'{losses.shape}'
    )
  if not (np.all(np.isfinite(lrs)) and np.all(lrs > 0) and np.all(np.diff(lrs) > 0)):
    raise ValueError('a rule needs positive, increasing learning rates')
  if not np.all(np.isfinite(losses)):
    raise ValueError('a rule needs finite losses (cut the curve where it diverges first)')
  return lrs, losses


def valley(lrs: Any, losses: Any, *, position: float = 2 / 3) -> float:
  """fastai's "valley": a point well down the longest decreasing stretch of the curve.

  The longest strictly decreasing subsequence of the losses is found (O(n^2), as fastai);
  it ends at index `end` and holds `k` points, read as the stretch [end - k + 1, end]. The
  suggestion is the learning rate `position` of the way along that stretch. fastai's
  documentation puts the point about 2/3 of the way, the default here; its index
  arithmetic (len/3 + len/6 from one before the stretch) lands nearer half way, which is
  `position=0.5`.

  Args:
    lrs: (n,) increasing learning rates.
    losses: (n,) finite losses at those rates.
    position: where along the stretch to suggest, 0 (its start) to 1 (its end).

  Returns:
    The suggested learning rate.
  """
  lrs, losses = _check_curve(lrs, losses)
  if not 0.0 <= position <= 1.0:
    raise ValueError(f'position must be in [0, 1]; got {position}')
  n = len(losses)
  longest = np.ones(n, np.int64)
  for i in range(1, n):
    before = losses[:i] > losses[i]
    if before.any():
      longest[i] = longest[:i][before].max() + 1
  end = int(np.argmax(longest))  # the first index reaching the longest length, as fastai
  start = max(0, end - int(longest[end]) + 1)
  return float(lrs[start + int(round(position * (end - start)))])


def steep(lrs: Any, losses: Any) -> float:
  """fastai's "steep": the learning rate where the loss falls fastest against log(lr).

  Args:
    lrs: (n,) increasing learning rates.
    losses: (n,) finite losses at those rates.

  Returns:
    The left end of the steepest segment, as fastai.
  """
  lrs, losses = _check_curve(lrs, losses)
  slopes = np.diff(losses) / np.diff(np.log(lrs))
  return float(lrs[int(np.argmin(slopes))])


def minimum(lrs: Any, losses: Any) -> float:
  """fastai's "minimum": the learning rate of the lowest loss, divided by 10.

  Args:
    lrs: (n,) increasing learning rates.
    losses: (n,) finite losses at those rates.

  Returns:
    A tenth of the learning rate at the minimum.
  """
  lrs, losses = _check_curve(lrs, losses)
  return float(lrs[int(np.argmin(losses))] / 10.0)


RULES: dict[str, Callable[..., float]] = {'valley': valley, 'steep': steep, 'minimum': minimum}


# ----------------------------------------------------------------------- result ----


@dataclasses.dataclass(frozen=True, eq=False)
class LRFinderResult:
  """What a learning-rate range test found.

  Attributes:
    lrs: (k,) learning rates tried, increasing. The ramp's stop at divergence drops the
      steps after it, so k <= num_it; the grid keeps all num_it.
    losses: (k,) the loss at each: for the ramp the smoothed batch loss of the step taken at
      that rate; for the grid the final train loss of the run at that rate, +inf for runs
      the engine marked diverged or whose loss is not finite.
    suggestion: the learning rate of the rule asked for (`suggest`).
    suggestions: rule name -> learning rate, for every rule of `RULES`.
    method: 'ramp' or 'grid'.
    suggest: the rule behind `suggestion`.
    raw_losses: (k,) for the ramp the batch losses before smoothing; for the grid the same
      as `losses`.
    curve_lrs: (c,) the learning rates of the curve the rules were applied to: the ramp's
      points without fastai's trimmed ends (the first num_it // 10, the last 5), or for the
      grid a fine log-spaced grid over the fitted range.
    curve_losses: (c,) the losses of that curve (for the grid, the fitted spline's values).
    result: the grid's `sweep.Result` (None for the ramp).
  """

  lrs: np.ndarray
  losses: np.ndarray
  suggestion: float
  suggestions: dict[str, float]
  method: str
  suggest: str = 'valley'
  raw_losses: np.ndarray | None = None
  curve_lrs: np.ndarray | None = None
  curve_losses: np.ndarray | None = None
  result: Any = None

  def save(self, workdir: str) -> tuple[str, str]:
    """Saves this range test into a workdir as lr_find.csv and lr_find.json, for
    `sweep report` (and `LRFinderResult.load`) to read.

    Returns:
      The paths of the CSV (columns lr, loss; inf for a diverged rate) and the JSON file
      (method, suggest, suggestion, suggestions, curve_lrs, curve_losses; NaN as null).
    """
    import json
    import os

    import pandas as pd

    from sweep.files import atomic_write

    csv_path = os.path.join(workdir, LR_FIND_CSV)
    json_path = os.path.join(workdir, LR_FIND_JSON)
    frame = pd.DataFrame(
      {'lr': np.asarray(self.lrs, np.float64), 'loss': np.asarray(self.losses, np.float64)}
    )
    atomic_write(csv_path, frame.to_csv(index=False))
    meta = {
      'method': self.method,
      'suggest': self.suggest,
      'suggestion': _json_number(self.suggestion),
      'suggestions': {k: _json_number(v) for k, v in self.suggestions.items()},
    }
    if self.curve_lrs is not None and self.curve_losses is not None:
      meta['curve_lrs'] = [_json_number(v) for v in self.curve_lrs]
      meta['curve_losses'] = [_json_number(v) for v in self.curve_losses]
    atomic_write(json_path, json.dumps(meta, indent=2))
    return csv_path, json_path

  @classmethod
  def load(cls, workdir: str) -> LRFinderResult | None:
    """The range test saved in a workdir by `save` (None when there is none).

    Only lr_find.csv is required. Without lr_find.json (or without suggestions in it) the
    suggestions are computed from the finite points with `RULES`.
    """
    import json
    import os

    import pandas as pd

    csv_path = os.path.join(workdir, LR_FIND_CSV)
    if not os.path.exists(csv_path):
      return None
    frame = pd.read_csv(csv_path)
    if not {'lr', 'loss'} <= set(frame.columns):
      raise ValueError(f'{csv_path} needs the columns lr and loss; it has {list(frame.columns)}')
    frame = frame.sort_values('lr')
    lrs = frame['lr'].to_numpy(np.float64)
    losses = frame['loss'].to_numpy(np.float64)
    meta: dict[str, Any] = {}
    json_path = os.path.join(workdir, LR_FIND_JSON)
    if os.path.exists(json_path):
      with open(json_path) as f:
        meta = json.load(f)

    def number(v):
      return math.nan if v is None else float(v)

    suggestions = {k: number(v) for k, v in (meta.get('suggestions') or {}).items()}
    if not suggestions:
      finite = np.isfinite(losses) & (lrs > 0)
      for name, rule in RULES.items():
        try:
          suggestions[name] = rule(lrs[finite], losses[finite])
        except ValueError:
          suggestions[name] = math.nan
    suggest = meta.get('suggest') or (
      'valley' if 'valley' in suggestions else next(iter(suggestions))
    )
    suggestion = (
      number(meta['suggestion']) if 'suggestion' in meta else suggestions.get(suggest, math.nan)
    )
    curve_lrs = curve_losses = None
    if meta.get('curve_lrs') and meta.get('curve_losses'):
      curve_lrs = np.array([number(v) for v in meta['curve_lrs']])
      curve_losses = np.array([number(v) for v in meta['curve_losses']])
    return cls(
      lrs=lrs,
      losses=losses,
      suggestion=suggestion,
      suggestions=suggestions,
      method=meta.get('method', 'grid'),
      suggest=suggest,
      raw_losses=losses.copy(),
      curve_lrs=curve_lrs,
      curve_losses=curve_losses,
    )

  def plot(self, ax: Any = None) -> Any:
    """Plots loss against learning rate (log x axis) and marks the suggestion.

    Draws with matplotlib's Agg canvas when no Axes is given, so nothing opens a window.

    Args:
      ax: a matplotlib Axes to draw into; None makes a new figure.

    Returns:
      The Axes.
    """
    if ax is None:
      from matplotlib.backends.backend_agg import FigureCanvasAgg
      from matplotlib.figure import Figure

      fig = Figure(figsize=(6, 4))
      FigureCanvasAgg(fig)
      ax = fig.add_subplot()
    finite = np.isfinite(self.losses)
    label = 'smoothed batch loss' if self.method == 'ramp' else 'train loss after the budget'
    ax.plot(
      self.lrs[finite], self.losses[finite], '-' if self.method == 'ramp' else 'o', label=label
    )
    if self.method == 'grid' and self.curve_lrs is not None and len(self.curve_lrs):
      ax.plot(self.curve_lrs, self.curve_losses, '-', label='fitted curve')
    if self.curve_lrs is not None and len(self.curve_lrs):
      xs, ys = self.curve_lrs, self.curve_losses
    else:
      xs, ys = self.lrs[finite], self.losses[finite]
    for name, lr in self.suggestions.items():
      if not math.isfinite(lr):
        continue
      y = float(np.interp(np.log(lr), np.log(xs), ys)) if len(xs) else np.nan
      style = (
        dict(marker='o', markersize=8) if name == self.suggest else dict(marker='x', markersize=6)
      )
      ax.plot([lr], [y], linestyle='none', label=f'{name}: {lr:.3g}', **style)
    if math.isfinite(self.suggestion):
      ax.axvline(self.suggestion, color='0.5', linestyle=':', linewidth=1)
    if len(ys) and np.all(np.isfinite(ys)):
      # Frame the curve the rules read: the blow-up after it would squash it flat.
      low, high = float(np.min(ys)), float(np.max(ys))
      pad = 0.1 * (high - low) or 0.1 * abs(high) or 1.0
      ax.set_ylim(low - pad, high + pad)
    ax.set_xscale('log')
    ax.set_xlabel('learning rate')
    ax.set_ylabel('loss')
    ax.set_title(f'learning-rate range test ({self.method}): {self.suggest} {self.suggestion:.3g}')
    ax.legend(loc='best', fontsize='small')
    return ax


# -------------------------------------------------------------------- arguments ----


def _check_arguments(
  method, start_lr, end_lr, num_it, suggest, budget, beta, stop_factor, plateau
) -> None:
  if method not in METHODS:
    raise config_error('method', method, 'expected one of ' + ', '.join(METHODS))
  if suggest not in RULES:
    raise config_error('suggest', suggest, 'expected one of ' + ', '.join(RULES))
  for name, v in (('start_lr', start_lr), ('end_lr', end_lr)):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
      raise config_error(name, v, 'expected a finite number > 0')
  if start_lr >= end_lr:
    raise config_error('start_lr', start_lr, f'expected a learning rate below end_lr={end_lr!r}')
  if isinstance(num_it, bool) or not isinstance(num_it, numbers.Integral) or num_it < 5:
    raise config_error('num_it', num_it, 'expected an integer >= 5')
  if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1:
    raise config_error('budget', budget, 'expected a positive integer number of updates')
  if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta < 1:
    raise config_error('beta', beta, 'expected a number in [0, 1)')
  if (
    isinstance(stop_factor, bool)
    or not isinstance(stop_factor, numbers.Real)
    or not stop_factor > 1
  ):
    raise config_error('stop_factor', stop_factor, 'expected a number > 1')
  if isinstance(plateau, bool) or not isinstance(plateau, numbers.Real) or not 0 <= plateau < 1:
    raise config_error('plateau', plateau, 'expected a fraction in [0, 1)')


def _suggest_all(lrs: np.ndarray, losses: np.ndarray) -> dict[str, float]:
  if len(lrs) < 2:
    return {name: math.nan for name in RULES}
  return {name: rule(lrs, losses) for name, rule in RULES.items()}


def _first_values(plan) -> dict[str, Any]:
  """Every field but the learning rate as the first run has it: the one run the test studies."""
  fields = run_fields(plan, plan.runs[0])
  del fields['learning_rate']
  return fields


# ------------------------------------------------------------------------- ramp ----


@functools.lru_cache(maxsize=16)
def _ramp_program(structure: train.Structure, beta: float, stop_factor: float):
  """The jitted ramp for one model, loss and optimizer: every other input is data.

  Each step is the engine's: the model in training mode with its state and the seed's
  keys for that update (`train.update_key`), the batch augmented as in a sweep.
  """
  family = structure.family

  def program(params, model_state, seed, hypers, lrs, batches, x, y):
    opt = optimizers.make(family, hypers)

    def batch_loss(p, state, xb, yb, key):
      pred, new_state = structure.forward(p, state, xb, True, key)
      return jnp.mean(structure.metrics(pred, yb)[0]), new_state

    def live(carry, lr, idx):
      params, state, opt_state, avg, best, _, count = carry
      xb = jax.tree.map(lambda a: a[idx], x)
      if structure.augment is not None:
        xb = structure.augment(train.update_key(seed, count, train.AUGMENT_STREAM), xb)
      key = train.update_key(seed, count, train.MODEL_STREAM)
      (loss, state), grads = jax.value_and_grad(batch_loss, has_aux=True)(
        optimizers.model_params(params), state, xb, y[idx], key
      )
      opt_state = optimizers.with_learning_rate(opt_state, lr)
      updates, opt_state = opt.update(grads, opt_state, params)
      # fastai's AvgSmoothLoss: an exponential moving average divided by 1 - beta^t, so the
      # first steps are not pulled towards the zero it starts from.
      avg = beta * avg + (1.0 - beta) * loss
      count = count + 1
      smooth = avg / (1.0 - beta ** count.astype(jnp.float32))
      best = jnp.minimum(best, smooth)
      stop = ~jnp.isfinite(smooth) | (smooth > stop_factor * best)
      carry = (optax.apply_updates(params, updates), state, opt_state, avg, best, stop, count)
      return carry, (loss, smooth, jnp.ones((), bool))

    def skipped(carry, lr, idx):
      del lr, idx
      nan = jnp.full((), jnp.nan, jnp.float32)
      return carry, (nan, nan, jnp.zeros((), bool))

    def body(carry, xs):
      lr, idx = xs
      # A scalar predicate: once stopped the remaining steps cost nothing.
      return jax.lax.cond(carry[5], skipped, live, carry, lr, idx)

    zero = jnp.zeros((), jnp.float32)
    params = optimizers.trained_params(opt, params)  # a lookahead's LookaheadParams
    carry = (
      params,
      model_state,
      opt.init(params),
      zero,
      jnp.full((), jnp.inf, jnp.float32),
      jnp.zeros((), bool),
      jnp.zeros((), jnp.int32),
    )
    _, (raw, smooth, taken) = jax.lax.scan(body, carry, (lrs, batches))
    return raw, smooth, taken

  return train.jit(program)


def _ramp_batches(seed: int, n: int, batch: int, steps: int, shuffle: bool) -> np.ndarray:
  """(steps, batch) example indices: consecutive batches of the seed's data order.

  The order is the engine's: epoch e reads `train.epoch_order(seed, e, n)` (or 0..n-1
  without shuffling) in slices of `batch`, dropping the last n % batch examples.
  """
  per_epoch = n // batch
  epochs = -(-steps // per_epoch)
  if shuffle:
    orders = np.stack(
      [np.asarray(train.epoch_order_jit(np.int32(seed), np.int32(e), n)) for e in range(epochs)]
    )
  else:
    orders = np.broadcast_to(np.arange(n, dtype=np.int32), (epochs, n))
  step = np.arange(steps)
  cols = (step % per_epoch)[:, None] * batch + np.arange(batch)[None, :]
  return np.asarray(orders[(step // per_epoch)[:, None], cols], np.int32)


def _ramp(cfg, start_lr, end_lr, num_it, suggest, beta, stop_factor) -> LRFinderResult:
  plan = engine.check(cfg)
  first = _first_values(plan)
  run = plan.runs[0]  # every axis at its first value, optimizer defaults filled in
  if optimizers.every_k(run.family) > 1:
    raise config_error(
      'method',
      'ramp',
      f'optimizer {run.family.label} accumulates k={run.family.every_k} batches per update '
      "(optax.MultiSteps) and the ramp raises the learning rate every batch: use method='grid', "
      'whose runs update on the parameter-update clock',
    )
  hypers = {k: np.float32(v) for k, v in run.hypers.items()}
  data = cfg.data
  model = engine.model_of(cfg, plan.output_dim)
  structure = train.Structure(
    model=model,
    loss=plan.loss,
    family=run.family,
    batch_sizes=(),
    steps_per_segment=(),
    steps_per_epoch=(),
    eval_batch_size=1,
    compute_dtype=cfg.compute_dtype,
    augment=cfg.augment,
    ignore_label=data.ignore_label,
    accuracy=None,
  )
  program = _ramp_program(structure, float(beta), float(stop_factor))

  seed, batch = int(first['seed']), int(first['batch_size'])
  lrs = start_lr * (end_lr / start_lr) ** (np.arange(num_it) / (num_it - 1))
  batches = _ramp_batches(seed, data.n_train, batch, num_it, cfg.shuffle)
  if model.initial is not None:
    params, model_state = model.initial
  else:
    params, model_state = train.seeded_init_jit(model.init, np.int32(seed))
  raw, smooth, taken = jax.device_get(
    program(
      params,
      model_state,
      np.int32(seed),
      hypers,
      jnp.asarray(lrs, jnp.float32),
      jnp.asarray(batches),
      data.x_train,
      data.y_train,
    )
  )
  k = int(np.sum(taken))
  lrs, raw, smooth = lrs[:k], np.asarray(raw[:k], np.float64), np.asarray(smooth[:k], np.float64)
  # The step that tripped the stop is kept (as fastai records it) unless it is not finite.
  keep = np.isfinite(smooth)
  if not keep.all():
    cut = int(np.argmin(keep))
    lrs, raw, smooth = lrs[:cut], raw[:cut], smooth[:cut]

  # fastai applies its rules without the first num_it // 10 steps (the average is still
  # settling) and the last 5 (the blow-up); too short a curve keeps every point.
  lo, hi = num_it // 10, len(lrs) - 5
  curve = slice(lo, hi) if hi - lo >= 3 else slice(0, len(lrs))
  suggestions = _suggest_all(lrs[curve], smooth[curve])
  return LRFinderResult(
    lrs=lrs,
    losses=smooth,
    suggestion=suggestions[suggest],
    suggestions=suggestions,
    method='ramp',
    suggest=suggest,
    raw_losses=raw,
    curve_lrs=lrs[curve],
    curve_losses=smooth[curve],
  )


# ------------------------------------------------------------------------- grid ----


def _grid_curve(lrs: np.ndarray, losses: np.ndarray, stop_factor: float, points_per_decade: int):
  """The curve the rules read for the grid: a smoothing spline of log(loss) in log10(lr).

  The points end where the ramp would stop: before the first loss that is not finite or
  exceeds `stop_factor` times the lowest loss at smaller learning rates. The spline is
  scipy's `make_smoothing_spline` (a cubic smoothing spline, its smoothness chosen by
  generalized cross-validation), fitted to log(loss) so that it stays positive and the
  orders of magnitude a loss falls through weigh alike; it is evaluated on a fine log grid.
  Fewer than 5 points (too few for the spline) are used as they are.
  """
  best = np.minimum.accumulate(np.where(np.isfinite(losses), losses, np.inf))
  bad = ~np.isfinite(losses) | (losses > stop_factor * best) | (losses <= 0)
  end = int(np.argmax(bad)) if bad.any() else len(losses)
  x, y = np.log10(lrs[:end]), np.log(losses[:end])
  if end < 5:
    return lrs[:end], losses[:end]
  from scipy.interpolate import make_smoothing_spline

  spline = make_smoothing_spline(x, y)
  fine = np.linspace(x[0], x[-1], max(end, int(math.ceil((x[-1] - x[0]) * points_per_decade)) + 1))
  return 10.0**fine, np.exp(spline(fine))


def _plateau_end(log_losses: np.ndarray, plateau: float) -> int:
  """The first index past the plateau: where log(loss) has fallen through the fraction
  `plateau` of its drop from the first point to the minimum (searched up to the minimum)."""
  low = int(np.argmin(log_losses))
  level = log_losses[0] - plateau * (log_losses[0] - log_losses[low])
  above = np.nonzero(log_losses[: low + 1] > level)[0]
  # At least two points stay for the rule.
  return min(int(above[-1]) + 1, len(log_losses) - 2) if len(above) else 0


def _grid(cfg, start_lr, end_lr, num_it, suggest, budget, stop_factor, plateau) -> LRFinderResult:
  plan = validate(cfg)
  lrs = np.geomspace(start_lr, end_lr, num_it)
  first = _first_values(plan)
  first['schedule'] = 'constant'
  grid_cfg = cfg.replace(
    **first, learning_rate=[float(v) for v in lrs], updates=int(budget), epochs=None, num_evals=1
  )
  result = engine.run(grid_cfg, progress=False)
  table = result.table.sort_values('learning_rate')
  losses = table['final_train_loss'].to_numpy(np.float64)
  losses = np.where((table['status'] == 'ok').to_numpy() & np.isfinite(losses), losses, np.inf)
  lrs = table['learning_rate'].to_numpy(np.float64)

  curve_lrs, curve_losses = _grid_curve(lrs, losses, stop_factor, points_per_decade=20)
  if len(curve_lrs) >= 2:
    # Every run starts from the same parameters and reads the same batches, so the curve
    # has no noise, and at small rates it falls by tiny amounts that are strict decreases
    # all the same: left in, that plateau would be the longest "valley". It is cut where
    # the curve has fallen through the first `plateau` of its drop in log(loss).
    cut = _plateau_end(np.log(curve_losses), plateau)
    suggestions = {
      'valley': valley(curve_lrs[cut:], curve_losses[cut:]),
      'steep': steep(curve_lrs, curve_losses),
      'minimum': minimum(curve_lrs, curve_losses),
    }
  else:
    suggestions = {name: math.nan for name in RULES}
  return LRFinderResult(
    lrs=lrs,
    losses=losses,
    suggestion=suggestions[suggest],
    suggestions=suggestions,
    method='grid',
    suggest=suggest,
    raw_losses=losses.copy(),
    curve_lrs=curve_lrs,
    curve_losses=curve_losses,
    result=result,
  )


# ---------------------------------------------------------------------- lr_find ----


def lr_find(
  cfg: SweepConfig,
  method: str = 'grid',
  start_lr: float = 1e-7,
  end_lr: float = 10.0,
  num_it: int = 100,
  suggest: str = 'valley',
  *,
  budget: int = 50,
  beta: float = 0.98,
  stop_factor: float = 4.0,
  plateau: float = 0.25,
) -> LRFinderResult:
  """A learning-rate range test of `cfg`'s model, loss, optimizer and data.

  The test studies one run of the sweep: every axis but the learning rate at its first
  value (the first optimizer, batch size, seed, momentum, ...); `cfg`'s learning rates,
  schedule and budget are ignored.

  - 'ramp': one run of `num_it` updates, the learning rate growing by a constant factor
    from `start_lr` (the first update) to `end_lr` (the last); the batches are consecutive
    slices of the seed's data order and the initial parameters the seed's, as in a sweep.
    The batch loss of each step is smoothed by fastai's bias-corrected moving average
    (`beta`); the test stops once the smoothed loss exceeds `stop_factor` times its best,
    and the steps after that are dropped. The rules read the smoothed losses without the
    first num_it // 10 and the last 5, as fastai's.
  - 'grid': `num_it` learning rates log-spaced from `start_lr` to `end_lr`, each trained
    for `budget` updates with a constant schedule, all at once by `sweep.run`; a run's loss
    is its final train loss (the engine's training-set probe; +inf when diverged). The rules
    read a cubic smoothing spline of log(loss) in log(lr) (smoothness by generalized
    cross-validation), fitted to the points before the first divergence (a loss above
    `stop_factor` times the best at smaller rates, or +inf): a smooth fit rather than the
    raw points, so that one odd run near the blow-up does not move the steepest slope or
    the minimum. The runs share their initial parameters and batches, so the curve has no
    noise, and at small rates it falls by amounts too small to matter that are strict
    decreases all the same; the valley rule therefore reads the curve from where it has
    fallen through the first `plateau` (a quarter) of its drop in log(loss) to its
    minimum. A fixed budget puts the grid's curve at lower rates than the ramp's (a ramp
    step at rate lr follows a few steps at similar rates, a grid run makes `budget`), so
    its steep and minimum suggestions are lower too. When every run diverges the
    suggestions are NaN: lower `start_lr`.

  Args:
    cfg: the sweep whose first run is tested.
    method: 'grid' or 'ramp'.
    start_lr: the smallest learning rate.
    end_lr: the largest learning rate.
    num_it: ramp steps, or grid points (at least 5).
    suggest: the rule behind `.suggestion`: 'valley', 'steep' or 'minimum'.
    budget: the grid's updates per learning rate.
    beta: the ramp's smoothing factor.
    stop_factor: divergence: a smoothed (ramp) or final (grid) loss above this multiple of
      the best so far.
    plateau: the fraction of the grid curve's drop in log(loss) the valley rule skips.

  Returns:
    An `LRFinderResult`.

  Raises:
    ConfigError: a bad argument, or a mistake in `cfg`.
  """
  _check_arguments(method, start_lr, end_lr, num_it, suggest, budget, beta, stop_factor, plateau)
  if method == 'ramp':
    return _ramp(cfg, float(start_lr), float(end_lr), int(num_it), suggest, beta, stop_factor)
  return _grid(
    cfg, float(start_lr), float(end_lr), int(num_it), suggest, budget, stop_factor, float(plateau)
  )
