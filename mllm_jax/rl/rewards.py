"""Rewards of SID completions, on the host: a registry of functions of strings -> (N, G) arrays.

A reward function sees a batch's groups the way the rollout produced them: `groups[n]` holds the
G completions of prompt n, decoded to SID strings ("<a_1><b_2><c_3>"), in rank order when they
come from beam search (best first), and `targets[n]` the SID it should have recommended. It
returns (N, G) float32 rewards. The registered ones are MiniOneRec's (rl.py at commit 81b4ba9,
`reward_type` rule / ranking / ranking_only); `register` plugs in others under a name that
`rl.reward` in a config can select.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from mllm_jax.config import ConfigError

RewardFn = Callable[[list[list[str]], list[str]], np.ndarray]
"""(groups: N lists of G completions as SID strings, in rank order for beam search (best first);
targets: N SID strings) -> (N, G) float32 rewards."""

REWARDS: dict[str, RewardFn] = {}
"""Name -> reward function; `rl.reward` selects one by name."""


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a reward function to REWARDS under `name`, so that a new reward is one
    function in any module, not an edit of the recipe."""

    def add(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return add


def get(name: str) -> RewardFn:
    """The reward function registered as `name`; an unknown name is a one-line ConfigError."""
    if name not in REWARDS:
        raise ConfigError(f"rl.reward: expected one of {', '.join(sorted(REWARDS))}, got {name!r}")
    return REWARDS[name]


def _normalized(sid: str) -> str:
    """A SID without the newline, quotes and spaces around it: MiniOneRec compares
    `completion.strip("\\n\\" ")` with the target stripped the same way (the decoded completion
    ends with "\\n", the target in its data is "SID\\n")."""
    return sid.strip('\n" ')


def _hits(groups: list[list[str]], targets: list[str]) -> np.ndarray:
    """(N, G) bool: completion equals its group's target. All groups must have the same size."""
    if len(groups) != len(targets):
        raise ValueError(f"{len(groups)} groups of completions but {len(targets)} targets")
    if not groups:
        return np.zeros((0, 0), bool)
    sizes = {len(g) for g in groups}
    if len(sizes) > 1:
        raise ValueError(f"groups of different sizes {sorted(sizes)}: rewards are an (N, G) array")
    return np.array([[_normalized(c) == _normalized(t) for c in g] for g, t in zip(groups, targets)],
                    dtype=bool).reshape(len(groups), -1)


@register("rule")
def rule(groups: list[list[str]], targets: list[str]) -> np.ndarray:
    """1.0 for the exact target SID, else 0.0 (MiniOneRec rl.py `rule_reward`)."""
    return _hits(groups, targets).astype(np.float32)


def ndcg_penalties(G: int) -> np.ndarray:
    """(G,) the penalty of a miss at each rank: -(1/log2(i+2)) / sum_{j<G} 1/log2(j+2), an NDCG
    discount normalized to sum to -1 (MiniOneRec rl.py `ndcg_rewards`)."""
    discounts = np.array([1.0 / math.log2(i + 2) for i in range(G)])
    return (-discounts / discounts.sum()).astype(np.float32)


@register("ranking_only")
def ranking_only(groups: list[list[str]], targets: list[str]) -> np.ndarray:
    """In a group that contains the target, a miss at rank i gets ndcg_penalties(G)[i] and a hit 0:
    misses ranked above the target cost most. A group without the target gets all 0 (there is
    nothing to rank against). MiniOneRec rl.py `ndcg_rule_reward` (reward_type "ranking_only")."""
    hits = _hits(groups, targets)
    penalties = np.where(hits, 0.0, ndcg_penalties(hits.shape[1])[None, :])
    return np.where(hits.any(axis=1, keepdims=True), penalties, 0.0).astype(np.float32)


@register("ranking")
def ranking(groups: list[list[str]], targets: list[str]) -> np.ndarray:
    """rule + ranking_only, each with weight 1: MiniOneRec's reward_type "ranking" passes
    [rule_reward, ndcg_rule_reward] to TRL, which sums reward functions (reward_weights 1)."""
    return rule(groups, targets) + ranking_only(groups, targets)
