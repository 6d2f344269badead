"""PyTorch's SGD and Adam as optax transformations, with the learning rate
set from outside on every step.

Both add weight decay to the gradient before anything else (L2, as
`torch.optim.SGD` / `torch.optim.Adam` with `weight_decay`, not AdamW). SGD's
momentum buffer starts at zero, which equals PyTorch's first-step rule
(buffer = gradient) since dampening is 0. The learning rate is an injected
hyper-parameter so that the training loop can pass the per-iteration cosine
value without recompiling, and so that the virtual step uses exactly the real
step's learning rate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _sgd(learning_rate, momentum, weight_decay):
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(learning_rate),
  )


def _adam(learning_rate, weight_decay, b1, b2, eps):
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.scale_by_learning_rate(learning_rate),
  )


def torch_sgd(learning_rate: float, momentum: float = 0.9,
              weight_decay: float = 1e-4) -> optax.GradientTransformation:
  """`torch.optim.SGD(lr, momentum, weight_decay)` (no dampening/Nesterov)."""
  return optax.inject_hyperparams(_sgd)(
      learning_rate=learning_rate, momentum=momentum,
      weight_decay=weight_decay)


def torch_adam(learning_rate: float, weight_decay: float = 0.0,
               b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8) -> optax.GradientTransformation:
  """`torch.optim.Adam(lr, betas, eps, weight_decay)` (L2, not decoupled)."""
  return optax.inject_hyperparams(_adam, static_args=('b1', 'b2', 'eps'))(
      learning_rate=learning_rate, weight_decay=weight_decay, b1=b1, b2=b2,
      eps=eps)


def with_learning_rate(opt_state, learning_rate) -> optax.OptState:
  """The state of an injected-hyper-parameter optimizer with a new rate."""
  hyperparams = dict(opt_state.hyperparams)
  old = hyperparams['learning_rate']
  hyperparams['learning_rate'] = jnp.asarray(learning_rate, dtype=old.dtype)
  return opt_state._replace(hyperparams=hyperparams)


def learning_rate_of(opt_state) -> jax.Array:
  return opt_state.hyperparams['learning_rate']


def sgd_momentum(opt_state):
  """The momentum buffers (a params-shaped tree) of a `torch_sgd` state."""
  return opt_state.inner_state[1].trace


def adam_moments(opt_state):
  """(step count, first moments, second moments) of a `torch_adam` state;
  the moments are params-shaped trees."""
  adam = opt_state.inner_state[1]
  return adam.count, adam.mu, adam.nu


def with_sgd_momentum(opt_state, momentum_tree):
  """A `torch_sgd` state whose momentum buffers are `momentum_tree`."""
  inner = list(opt_state.inner_state)
  inner[1] = inner[1]._replace(trace=momentum_tree)
  return opt_state._replace(inner_state=tuple(inner))


def apply_optimizer(tx: optax.GradientTransformation, grads, opt_state,
                    params, learning_rate):
  """One update at `learning_rate`: returns (new_params, new_opt_state)."""
  opt_state = with_learning_rate(opt_state, learning_rate)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state
