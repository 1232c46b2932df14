"""The RL algorithms as data: which advantages, which clipped loss, whether to filter groups.

GRPO, DAPO, GSPO, RLOO and REINFORCE++ share the rollout, the log-probs and the update; what
differs is an advantage function (rl/advantages.py), the two choices of rl/losses.py's
PolicyLoss with its clip range, and DAPO's dynamic sampling. Each default below is from the
method's paper or the reference implementation named next to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from mllm_jax.rl import advantages as adv
from mllm_jax.rl.losses import PolicyLoss


@dataclass(frozen=True)
class Algorithm:
    advantages: Callable[[np.ndarray], np.ndarray]
    """(N, G) rewards -> (N, G) advantages, over the whole global batch."""
    level: str
    """PolicyLoss.level: "token" or "sequence" importance ratios."""
    aggregation: str
    """PolicyLoss.aggregation: "sequence_mean" or "token_mean"."""
    epsilon_low: float
    epsilon_high: float
    dynamic_sampling: bool
    """DAPO: groups whose rewards are all equal (no signal) are masked out of the loss."""

    def policy_loss(self, beta: float) -> PolicyLoss:
        """The PolicyLoss of this algorithm with KL weight `beta` (a run's choice, not the method's)."""
        return PolicyLoss(self.level, self.aggregation, self.epsilon_low, self.epsilon_high, beta)


ALGORITHMS: dict[str, Algorithm] = {
    # DeepSeekMath (arXiv 2402.03300); clip 0.2 both sides as TRL GRPOConfig.epsilon (epsilon_high defaults to it).
    "grpo": Algorithm(adv.grpo, "token", "sequence_mean", 0.2, 0.2, dynamic_sampling=False),
    # DAPO (arXiv 2503.14476): clip-higher 0.2 / 0.28, token-level loss, dynamic sampling.
    "dapo": Algorithm(adv.grpo, "token", "token_mean", 0.2, 0.28, dynamic_sampling=True),
    # GSPO (arXiv 2507.18071): sequence-level ratio, clip 3e-4 / 4e-4 (also TRL's GSPO recipe).
    "gspo": Algorithm(adv.grpo, "sequence", "sequence_mean", 3e-4, 4e-4, dynamic_sampling=False),
    # RLOO (arXiv 2402.14740) with TRL RLOOConfig's clip 0.2. TRL's RLOOTrainer takes the ratio of whole
    # sequences (sum of token log-ratios); per token with a sequence mean gives the same gradient up to a
    # factor 1/length at ratio 1, and SIDs have one length.
    "rloo": Algorithm(adv.rloo, "token", "sequence_mean", 0.2, 0.2, dynamic_sampling=False),
    # REINFORCE++ (arXiv 2501.03262) as OpenRLHF: PolicyLoss clip 0.2 / 0.2, token_level_loss (token mean).
    "reinforce++": Algorithm(adv.reinforce_pp, "token", "token_mean", 0.2, 0.2, dynamic_sampling=False),
}


def dynamic_sampling_keep(rewards: np.ndarray) -> np.ndarray:
    """(N, G) rewards -> (N,) bool: groups whose rewards are not all equal. DAPO's dynamic sampling
    (arXiv 2503.14476: the constraint 0 < |correct| < G) drops the others, whose advantages
    are all 0; here they are kept as a mask on the loss so shapes stay fixed under jit."""
    r = np.asarray(rewards)
    return ~np.all(r == r[:, :1], axis=1)
