"""The clipped policy-gradient loss of GRPO and its variants (DAPO, GSPO, ...), one pure function.

The variants differ in two choices, named by `PolicyLoss`: whether the importance ratio is per
token or per sequence, and how per-token losses are averaged. The formula is TRL's
(trl==1.16.0, GRPOTrainer._compute_loss; tests/test_rl_trl_parity.py compares values and
gradients). The loss takes the normalizer of the whole global batch, so a batch split into
micro-batches (gradient accumulation) sums to exactly the whole batch's loss: TRL divides DAPO's
loss by the generation batch's token count (`num_items_in_batch`) for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class PolicyLoss:
    """Which clipped surrogate: the defaults of each algorithm are in rl/algorithms.py."""

    level: Literal["token", "sequence"]
    """Importance ratio per token (GRPO, DAPO) or per sequence (GSPO, Zheng et al. 2025, arXiv
    2507.18071: exp of the masked mean log-ratio of the sequence, shared by its tokens)."""
    aggregation: Literal["sequence_mean", "token_mean"]
    """GRPO: mean over sequences of each one's masked token mean; DAPO (Yu et al. 2025, arXiv
    2503.14476, "token-level policy gradient loss"): masked mean over all tokens of the batch, so long
    completions weigh by their length."""
    epsilon_low: float
    """The ratio is clipped below at 1 - epsilon_low."""
    epsilon_high: float
    """... and above at 1 + epsilon_high (DAPO's clip-higher makes it larger than epsilon_low)."""
    beta: float
    """Weight of the k3 KL estimate to the reference policy per token,
    exp(ref - logp) - (ref - logp) - 1 (Schulman's k3, as DeepSeekMath's GRPO,
    arXiv 2402.03300); 0 drops the reference."""


def policy_loss(logps: jax.Array, old_logps: jax.Array | None, ref_logps: jax.Array | None, advantages: jax.Array,
                mask: jax.Array, spec: PolicyLoss,
                normalizer: jax.Array | float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """TRL's GRPO loss per token, -min(coef_1 * A, clip(coef_1, 1-eps_low, 1+eps_high) * A) + beta * kl,
    aggregated by `spec.aggregation` and divided by `normalizer`.

    logps (B, T) float32, differentiable; old_logps (B, T), the policy's at generation, or None
    for stop_gradient(logps) (one update per rollout: ratio 1, the gradient of REINFORCE with a
    baseline); ref_logps (B, T), or None when beta == 0 (when given with beta == 0 it only feeds
    the "kl" sum); advantages (B,); mask (B, T) float32, 0 on padding after a completion's end and
    on sequences dropped by DAPO's dynamic sampling.

    `normalizer` is the count of the WHOLE global batch the aggregation divides by: its number of
    sequences for "sequence_mean", its mask sum for "token_mean". Micro-batches of one batch,
    each given the same global normalizer, then have losses (and gradients) that sum to the
    whole batch's.

    Returns (loss, sums): masked SUMS over this batch, for logging once summed over micro-batches:
    "kl" (per-token KL; 0 without ref_logps), "clipped" (TRL's clip_ratio/region: ratio below
    1-eps_low with A < 0 or above 1+eps_high with A > 0; counted per token at level "token" and
    per sequence at level "sequence", as TRL does), "tokens" (mask sum), "sequences" (rows with
    any mask). E.g. TRL's "kl" metric is sums["kl"] / sums["tokens"]."""
    logps = logps.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    old_logps = jax.lax.stop_gradient(logps) if old_logps is None else old_logps.astype(jnp.float32)
    tokens_per_row = mask.sum(axis=-1)
    rows = (tokens_per_row > 0).astype(jnp.float32)
    # Log-ratios are zeroed, not only masked, off the mask: exp of whatever sits on padding could
    # overflow, and inf * 0 is a NaN in the loss and its gradient.
    valid = mask > 0
    log_ratio = jnp.where(valid, logps - old_logps, 0.0)
    if spec.level == "token":
        log_weights = log_ratio
    elif spec.level == "sequence":
        log_weights = ((log_ratio * mask).sum(-1) / jnp.maximum(tokens_per_row, 1.0))[:, None]
    else:
        raise ValueError(f"PolicyLoss.level: expected token or sequence, got {spec.level!r}")
    coef_1 = jnp.exp(log_weights)
    coef_2 = jnp.clip(coef_1, 1 - spec.epsilon_low, 1 + spec.epsilon_high)
    adv = advantages.astype(jnp.float32)[:, None]
    per_token = -jnp.minimum(coef_1 * adv, coef_2 * adv)  # (B, T), or (B, 1) at level "sequence"

    if ref_logps is None:
        if spec.beta != 0:
            raise ValueError("policy_loss: beta != 0 needs ref_logps")
        kl = jnp.zeros_like(logps)
    else:
        delta = jnp.where(valid, ref_logps.astype(jnp.float32) - logps, 0.0)
        kl = jnp.exp(delta) - delta - 1
        if spec.beta != 0:
            per_token = per_token + spec.beta * kl
    per_token = jnp.broadcast_to(per_token, logps.shape)

    if spec.aggregation == "sequence_mean":
        total = ((per_token * mask).sum(-1) / jnp.maximum(tokens_per_row, 1.0)).sum()
    elif spec.aggregation == "token_mean":
        total = (per_token * mask).sum()
    else:
        raise ValueError(f"PolicyLoss.aggregation: expected sequence_mean or token_mean, got {spec.aggregation!r}")

    clipped = ((coef_1 < 1 - spec.epsilon_low) & (adv < 0)) | ((coef_1 > 1 + spec.epsilon_high) & (adv > 0))
    clipped = clipped.astype(jnp.float32)
    clipped_sum = (clipped * mask).sum() if spec.level == "token" else (clipped[:, 0] * rows).sum()
    sums = {"kl": jax.lax.stop_gradient((kl * mask).sum()), "clipped": jax.lax.stop_gradient(clipped_sum),
            "tokens": mask.sum(), "sequences": rows.sum()}
    return total / normalizer, sums
