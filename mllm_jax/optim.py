"""Optimizer and learning-rate schedule, built from optax parts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import jax
import optax

from mllm_jax.config import ConfigError, NonNegativeFloat, NonNegativeInt, PositiveFloat


@dataclass
class OptimizerConfig:
    """The optimizer keys of every recipe's `train` section (each recipe adds the keys of its
    learning-rate schedule): one declaration, so the recipes cannot drift apart."""

    optimizer: Literal["adamw", "lion", "sgd"] = "adamw"
    learning_rate: PositiveFloat = 3e-4
    """The peak, reached at the end of the warmup."""
    warmup_steps: NonNegativeInt = 20
    weight_decay: NonNegativeFloat = 0.0
    """Decoupled, on matrices and embeddings only (adamw, lion)."""
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: NonNegativeFloat = 1.0
    """Clip the global gradient norm to this; 0 = no clipping."""

    def validate(self) -> None:
        """The betas are decay rates: in [0, 1)."""
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"train.{name}: expected a number in [0, 1), got {value!r}")

    def build(self, schedule: optax.Schedule) -> optax.GradientTransformation:
        return optimizer(self.optimizer, schedule, self.beta1, self.beta2, self.weight_decay, self.grad_clip)


def warmup_cosine(learning_rate: float, min_lr: float, warmup_steps: int, decay_steps: int) -> optax.Schedule:
    """nanoGPT's schedule: lr*(s+1)/(warmup+1) while warming up, cosine to min_lr at
    `decay_steps`, then min_lr. (optax's warmup starting at lr/(warmup+1) is the same line.)"""
    return optax.warmup_cosine_decay_schedule(
        init_value=learning_rate / (warmup_steps + 1),
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(decay_steps, warmup_steps + 1),
        end_value=min_lr,
    )


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices and embeddings only (ndim >= 2), not on biases and norm scales."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _clipped(tx: optax.GradientTransformation, grad_clip: float) -> optax.GradientTransformation:
    """`tx` after clipping the global gradient norm to `grad_clip` (0 = no clipping)."""
    return optax.chain(*([optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []), tx)


def adamw(schedule: optax.Schedule, b1: float, b2: float, weight_decay: float,
          grad_clip: float) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay on matrices and embeddings only (ndim >= 2), after
    clipping the global gradient norm (0 = no clipping)."""
    return _clipped(optax.adamw(schedule, b1=b1, b2=b2, eps=1e-8, weight_decay=weight_decay, mask=_decay_mask),
                    grad_clip)


def warmup_decay(learning_rate: float, warmup_steps: int, total_steps: int, kind: str) -> optax.Schedule:
    """Hugging Face's schedules: linear warmup from 0, then "linear" or "cosine" decay to 0 at
    `total_steps` (get_linear/cosine_schedule_with_warmup), or "constant" after warmup."""
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "cosine":
        after = optax.cosine_decay_schedule(learning_rate, decay_steps)
    elif kind == "linear":
        after = optax.linear_schedule(learning_rate, 0.0, decay_steps)
    else:
        after = optax.constant_schedule(learning_rate)
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), after], [warmup_steps])


def optimizer(name: str, schedule: optax.Schedule, b1: float, b2: float, weight_decay: float,
              grad_clip: float) -> optax.GradientTransformation:
    """"adamw", "lion" (decoupled weight decay on ndim >= 2 params) or plain "sgd", after
    clipping the global gradient norm (0 = no clipping)."""
    if name == "adamw":
        return adamw(schedule, b1, b2, weight_decay, grad_clip)
    if name == "lion":
        return _clipped(optax.lion(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=_decay_mask), grad_clip)
    return _clipped(optax.sgd(schedule), grad_clip)
