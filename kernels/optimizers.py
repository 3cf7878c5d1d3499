"""Optimizer families, built from optax with every numeric hyperparameter injected.

An optimizer family (sgd, adam, ...) changes the code of the step, so it is part of
the compiled structure. Its numeric hyperparameters (the learning rate, momentum,
betas, weight decay) are arrays in the optimizer state through
`optax.inject_hyperparams`: each run of a vmapped sweep carries its own values and
new values never recompile. The learning rate held there is overwritten before
every update with the value of the run's schedule (see `kernels.schedules`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Family:
  """One optimizer family.

  Attributes:
    factory: the optax constructor, called as `factory(learning_rate=..., **hypers, **static)`.
    hypers: the numeric hyperparameters a sweep may set, with optax's defaults.
    static: fixed keyword arguments (booleans and the like) that pick the code path.
  """

  factory: Callable[..., optax.GradientTransformation]
  hypers: Mapping[str, float | None]
  static: Mapping[str, object] = dataclasses.field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    'sgd': Family(optax.sgd, {}),
    'momentum': Family(optax.sgd, {'momentum': 0.9}),
    'nesterov': Family(optax.sgd, {'momentum': 0.9}, {'nesterov': True}),
    'adam': Family(optax.adam, {'b1': 0.9, 'b2': 0.999}),
    'adamw': Family(optax.adamw, {'b1': 0.9, 'b2': 0.999, 'weight_decay': 1e-4}),
    # rmsprop's momentum is off (None) unless a sweep sets it; setting it adds a trace.
    'rmsprop': Family(optax.rmsprop, {'momentum': None}),
    'adagrad': Family(optax.adagrad, {}),
    'lion': Family(optax.lion, {'b1': 0.9, 'b2': 0.99, 'weight_decay': 1e-3}),
}

# Every hyperparameter name some family accepts, in a stable order.
HYPERPARAMETERS = ('momentum', 'b1', 'b2', 'weight_decay')


def families_accepting(name: str) -> list[str]:
  """The families whose optimizer takes hyperparameter `name`."""
  return [f for f, fam in FAMILIES.items() if name in fam.hypers]


def make(family: str, hypers: Mapping[str, jnp.ndarray]) -> optax.GradientTransformation:
  """The optimizer of `family` with injected (traceable) hyperparameters.

  Args:
    family: a key of `FAMILIES`.
    hypers: values for the numeric hyperparameters the run uses; scalars or traced
      arrays. Hyperparameters of the family missing here keep optax's defaults.

  Returns:
    An `optax.inject_hyperparams` transformation whose state holds
    `hyperparams['learning_rate']` and every entry of `hypers`.
  """
  fam = FAMILIES[family]
  # learning_rate starts at 0; the engine writes the scheduled value before each update.
  return optax.inject_hyperparams(fam.factory)(learning_rate=0.0, **hypers, **fam.static)


def with_learning_rate(opt_state: optax.OptState, learning_rate: jnp.ndarray) -> optax.OptState:
  """Returns `opt_state` (an inject_hyperparams state) using `learning_rate` next."""
  hyperparams = dict(opt_state.hyperparams)
  hyperparams['learning_rate'] = jnp.asarray(learning_rate, hyperparams['learning_rate'].dtype)
  return opt_state._replace(hyperparams=hyperparams)
