"""Advantages of a batch of groups: (N prompts, G completions) rewards -> (N, G) float32.

What distinguishes GRPO, RLOO and REINFORCE++ is mostly which baseline is subtracted from a
completion's reward and what it is divided by; each is one function here, on the host (numpy),
computed over the WHOLE global batch before it is split into micro-batches.
"""

from __future__ import annotations

import numpy as np

GRPO_EPS = 1e-4
"""Added to the group std: TRL grpo_trainer.py (`std_rewards + 1e-4`) and MiniOneRec
minionerec_trainer.py (`std_grouped_rewards + 1e-4`)."""

REINFORCE_PP_MIN_VAR = 1e-8
"""REINFORCE++ divides by sqrt(max(var, 1e-8)): OpenRLHF experience_maker.py
(`var.clamp(min=1e-8).rsqrt()`), the implementation of Hu (2025)."""


def _groups(rewards: np.ndarray) -> np.ndarray:
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards: expected (N prompts, G completions), got shape {r.shape}")
    return r


def grpo(rewards: np.ndarray) -> np.ndarray:
    """(r - group mean) / (group std + 1e-4), the std unbiased (ddof=1). Shao et al. 2024
    (DeepSeekMath) eq. in sec. 4.1.2; the std convention and eps are TRL's (scale_rewards="group",
    `nanstd` with Bessel's correction) and MiniOneRec's (torch `.std()`). A group whose rewards
    are all equal gets advantages 0 (no signal, not a division by zero)."""
    r = _groups(rewards)
    std = r.std(axis=1, ddof=1, keepdims=True) if r.shape[1] > 1 else np.zeros_like(r[:, :1])
    return ((r - r.mean(axis=1, keepdims=True)) / (std + GRPO_EPS)).astype(np.float32)


def rloo(rewards: np.ndarray) -> np.ndarray:
    """r_i - mean of the other G-1 rewards of its group: the REINFORCE Leave-One-Out baseline,
    Ahmadian et al. 2024 ("Back to Basics", arXiv 2402.14740), after Kool et al.
    2019. Needs G >= 2."""
    r = _groups(rewards)
    G = r.shape[1]
    if G < 2:
        raise ValueError("rloo needs at least 2 completions per prompt (the baseline is the others' mean)")
    others = (r.sum(axis=1, keepdims=True) - r) / (G - 1)
    return (r - others).astype(np.float32)


def reinforce_pp(rewards: np.ndarray) -> np.ndarray:
    """REINFORCE++ (Hu 2025, arXiv 2501.03262, eq. 10) with the KL in the loss, so the return is
    the reward: (r - batch mean) / batch std over the whole global batch (all groups together,
    no per-prompt baseline). As OpenRLHF (advantage_estimator="reinforce"): the std is the
    population one (ddof=0) and the variance is floored at 1e-8, i.e. / sqrt(max(var, 1e-8)).
    OpenRLHF weighs each token; with one value per completion that is each completion weighed by
    its length, the same as here when completions have equal lengths (SIDs do)."""
    r = _groups(rewards)
    centered = r - r.mean()
    return (centered / np.sqrt(max(float((centered**2).mean()), REINFORCE_PP_MIN_VAR))).astype(np.float32)
