"""The pure parts of RL (mllm_jax.rl: rewards, advantages, losses, algorithms) against their
published formulas, written out by hand here, and MiniOneRec's rewards against a port of its code.
TRL parity of the loss and its gradients on a real model is tests/test_rl_trl_parity.py."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.config import ConfigError
from mllm_jax.rl import advantages, rewards
from mllm_jax.rl.algorithms import ALGORITHMS, dynamic_sampling_keep
from mllm_jax.rl.losses import PolicyLoss, policy_loss

# ----------------------------------------------------------------------------- advantages

HAND_GROUPS = np.array([[1.0, 0.0, 0.0, 0.0],   # one hit at rank 0
                        [0.0, 1.0, 0.0, 1.0],   # two hits
                        [1.0, 1.0, 1.0, 1.0],   # all equal: no signal
                        [0.5, -0.5, 0.0, 2.0]])  # arbitrary values (ranking rewards are negative)


def test_grpo_advantages_by_hand():
    a = advantages.grpo(HAND_GROUPS)
    # [1,0,0,0]: mean 1/4, unbiased std sqrt((9/16 + 3/16) / 3) = 1/2.
    np.testing.assert_allclose(a[0], np.array([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4), rtol=1e-6)
    # [0,1,0,1]: mean 1/2, unbiased std sqrt(4 * 1/4 / 3) = sqrt(1/3).
    np.testing.assert_allclose(a[1], np.array([-0.5, 0.5, -0.5, 0.5]) / (math.sqrt(1 / 3) + 1e-4), rtol=1e-6)
    assert np.all(a[2] == 0)
    # [0.5,-0.5,0,2]: mean 1/2, deviations 0,-1,-1/2,3/2, unbiased var (0+1+1/4+9/4)/3 = 7/6.
    np.testing.assert_allclose(a[3], np.array([0.0, -1.0, -0.5, 1.5]) / (math.sqrt(7 / 6) + 1e-4), rtol=1e-6)
    assert a.dtype == np.float32 and a.shape == HAND_GROUPS.shape


def test_rloo_advantages_by_hand():
    a = advantages.rloo(HAND_GROUPS)
    np.testing.assert_allclose(a[0], [1.0, -1 / 3, -1 / 3, -1 / 3], rtol=1e-6)  # r_i - mean of the 3 others
    np.testing.assert_allclose(a[1], [-2 / 3, 2 / 3, -2 / 3, 2 / 3], rtol=1e-6)
    assert np.all(a[2] == 0)
    expected = [[r[i] - sum(r[j] for j in range(4) if j != i) / 3 for i in range(4)] for r in HAND_GROUPS.tolist()]
    np.testing.assert_allclose(a, expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="at least 2"):
        advantages.rloo(np.ones((3, 1)))


def test_reinforce_pp_advantages_by_hand():
    # Global normalization over all 16 rewards: population std (OpenRLHF), loops written out.
    flat = HAND_GROUPS.ravel().tolist()
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((r - mean) ** 2 for r in flat) / len(flat))
    expected = [[(r - mean) / std for r in row] for row in HAND_GROUPS.tolist()]
    np.testing.assert_allclose(advantages.reinforce_pp(HAND_GROUPS), expected, rtol=1e-6)
    # [[1,0],[0,0]]: mean 1/4, population std sqrt(3)/4 -> (3/4)/(sqrt(3)/4) = sqrt(3), -1/sqrt(3).
    np.testing.assert_allclose(advantages.reinforce_pp(np.array([[1.0, 0.0], [0.0, 0.0]])),
                               [[math.sqrt(3), -1 / math.sqrt(3)], [-1 / math.sqrt(3), -1 / math.sqrt(3)]], rtol=1e-6)
    # An all-equal batch: 0, not a division by zero (the variance is floored at 1e-8).
    assert np.all(advantages.reinforce_pp(np.full((2, 4), 3.0)) == 0)


def test_dynamic_sampling_keeps_groups_with_signal():
    np.testing.assert_array_equal(dynamic_sampling_keep(HAND_GROUPS), [True, True, False, True])
    np.testing.assert_array_equal(dynamic_sampling_keep(np.zeros((2, 3))), [False, False])


def test_algorithm_defaults():
    dapo, gspo = ALGORITHMS["dapo"], ALGORITHMS["gspo"]
    assert (dapo.epsilon_low, dapo.epsilon_high, dapo.aggregation, dapo.dynamic_sampling) == (0.2, 0.28, "token_mean",
                                                                                              True)
    assert (gspo.level, gspo.epsilon_low, gspo.epsilon_high) == ("sequence", 3e-4, 4e-4)
    assert ALGORITHMS["rloo"].advantages is advantages.rloo
    assert ALGORITHMS["reinforce++"].advantages is advantages.reinforce_pp
    assert ALGORITHMS["grpo"].policy_loss(0.04) == PolicyLoss("token", "sequence_mean", 0.2, 0.2, 0.04)

# ----------------------------------------------------------------------------- rewards
# A port of MiniOneRec rl.py at commit 81b4ba9 (`rule_reward`, `ndcg_rewards`, `ndcg_rule_reward`):
# the same steps over the flat lists TRL hands a reward function (G consecutive completions per
# prompt), with its prompt -> target lookup; completions and targets as it sees them ("SID\n").


def port_rule_reward(prompts, completions, prompt2target):
    targets = [prompt2target[p] for p in prompts]
    out = []
    for i, completion in enumerate(completions):
        out.append(1.0 if completion.strip("\n\" ") == targets[i].strip("\n\" ") else 0.0)
    return out


def port_ndcg_rule_reward(prompts, completions, prompt2target, num_generations):
    ndcg_rewards = [-1.0 / math.log2(i + 2) for i in range(num_generations)]
    ndcg_rewards = [-r / sum(ndcg_rewards) for r in ndcg_rewards]
    targets = [prompt2target[p] for p in prompts]
    out, flag, lis = [], False, []
    for i, completion in enumerate(completions):
        if completion.strip("\n\"") == targets[i].strip("\n\""):
            flag = True
            lis.append(0.0)
        else:
            lis.append(ndcg_rewards[i % num_generations])
        if (i + 1) % num_generations == 0:
            out.extend(lis if flag else [0.0] * num_generations)
            flag, lis = False, []
    return out


T = "<a_1><b_2><c_3>"
BEAMS = {  # prompt -> (target, beams best first)
    "rank 0": (T, [T, "<a_1><b_2><c_4>", "<a_9><b_9><c_9>", "<a_1><b_3><c_3>"]),
    "rank G-1": (T, ["<a_1><b_2><c_4>", "<a_9><b_9><c_9>", "<a_1><b_3><c_3>", T]),
    "absent": (T, ["<a_1><b_2><c_4>", "<a_9><b_9><c_9>", "<a_1><b_3><c_3>", "<a_2><b_2><c_2>"]),
    "duplicates": (T, ["<a_1><b_2><c_4>", T, "<a_1><b_2><c_4>", T]),
    "all hits": (T, [T, T, T, T]),
    "absent, duplicates": ("<a_5><b_5><c_5>", [T, T, "<a_1><b_2><c_4>", T]),
}


@pytest.mark.parametrize("name", ["rule", "ranking_only", "ranking"])
def test_rewards_equal_minionerec(name):
    G = 4
    prompts = [p for p in BEAMS for _ in range(G)]
    completions = [sid + "\n" for _, beams in BEAMS.values() for sid in beams]  # decoded text ends with "\n"
    prompt2target = {p: target + "\n" for p, (target, _) in BEAMS.items()}
    rule = port_rule_reward(prompts, completions, prompt2target)
    ndcg = port_ndcg_rule_reward(prompts, completions, prompt2target, G)
    expected = {"rule": rule, "ranking_only": ndcg, "ranking": [a + b for a, b in zip(rule, ndcg)]}[name]
    groups, targets = [beams for _, beams in BEAMS.values()], [target for target, _ in BEAMS.values()]
    ours = rewards.get(name)(groups, targets)
    assert ours.shape == (len(BEAMS), G) and ours.dtype == np.float32
    np.testing.assert_allclose(ours.ravel(), expected, rtol=1e-6)
    # The same completions as decoded text ("SID\n") give the same rewards.
    text_groups = [completions[i:i + G] for i in range(0, len(completions), G)]
    np.testing.assert_array_equal(rewards.get(name)(text_groups, [t + "\n" for t in targets]), ours)


def test_ranking_only_by_hand():
    d = [1 / math.log2(i + 2) for i in range(4)]
    got = rewards.get("ranking_only")([BEAMS["rank G-1"][1], BEAMS["absent"][1]], [T, T])
    np.testing.assert_allclose(got[0], [-d[0] / sum(d), -d[1] / sum(d), -d[2] / sum(d), 0.0], rtol=1e-6)
    assert np.all(got[1] == 0)


def test_register_plugs_a_reward_in():
    @rewards.register("test_length")
    def length(groups, targets):
        return np.array([[float(len(c)) for c in g] for g in groups], np.float32)

    try:
        assert rewards.get("test_length") is length
        np.testing.assert_array_equal(rewards.get("test_length")([["ab", "c"]], ["x"]), [[2.0, 1.0]])
    finally:
        del rewards.REWARDS["test_length"]


def test_unknown_reward_is_one_config_error_line():
    with pytest.raises(ConfigError) as e:
        rewards.get("bleu")
    message = str(e.value)
    assert "\n" not in message
    assert message == "rl.reward: expected one of ranking, ranking_only, rule, got 'bleu'"

# ----------------------------------------------------------------------------- policy loss


def loss_batch(B=7, T=5, seed=0):
    """Random log-probs of a batch with padding after each row's end and one dropped row."""
    rng = np.random.default_rng(seed)
    logps = jnp.asarray(-rng.uniform(0.1, 3.0, (B, T)), jnp.float32)
    old = logps + jnp.asarray(rng.normal(0, 0.3, (B, T)), jnp.float32)  # ratios far enough from 1 to clip
    ref = logps + jnp.asarray(rng.normal(0, 0.5, (B, T)), jnp.float32)
    adv = jnp.asarray(rng.normal(0, 1, (B,)), jnp.float32)
    lengths = rng.integers(1, T + 1, B)
    lengths[3] = 0  # a row dropped by dynamic sampling
    mask = jnp.asarray(np.arange(T)[None, :] < lengths[:, None], jnp.float32)
    return logps, old, ref, adv, mask


SPECS = [PolicyLoss(level, aggregation, *eps, beta=0.04)  # DAPO's and GSPO's clip ranges: both clip this batch
         for level, eps in (("token", (0.2, 0.28)), ("sequence", (3e-4, 4e-4)))
         for aggregation in ("sequence_mean", "token_mean")]


def global_normalizer(spec: PolicyLoss, mask) -> float:
    return float(mask.sum()) if spec.aggregation == "token_mean" else mask.shape[0]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.level}-{s.aggregation}")
def test_micro_batches_sum_to_the_whole_batch(spec):
    logps, old, ref, adv, mask = loss_batch()
    normalizer = global_normalizer(spec, mask)
    loss = jax.jit(jax.value_and_grad(partial(policy_loss, spec=spec, normalizer=normalizer), has_aux=True))
    (whole, whole_sums), whole_grad = loss(logps, old, ref, adv, mask)
    assert whole_sums["clipped"] > 0 and whole_sums["kl"] > 0
    total, grads, sums = 0.0, [], {}
    for rows in (slice(0, 2), slice(2, 3), slice(3, 7)):
        (part, part_sums), grad = loss(logps[rows], old[rows], ref[rows], adv[rows], mask[rows])
        total, grads = total + part, grads + [grad]
        sums = {k: sums.get(k, 0.0) + v for k, v in part_sums.items()}
    np.testing.assert_allclose(total, whole, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(jnp.concatenate(grads), whole_grad, rtol=1e-6, atol=1e-7)
    for k in whole_sums:
        np.testing.assert_allclose(sums[k], whole_sums[k], rtol=1e-6)
    assert whole_sums["tokens"] == mask.sum() and whole_sums["sequences"] == 6
    assert np.all(np.asarray(whole_grad)[np.asarray(mask) == 0] == 0)  # padding and dropped rows: no gradient


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.level}-{s.aggregation}")
def test_loss_equals_trl_formula_written_out(spec):
    """TRL 1.16 GRPOTrainer._compute_loss, as explicit loops over rows and tokens."""
    logps, old, ref, adv, mask = (np.asarray(x, np.float64) for x in loss_batch())
    B, T = logps.shape
    total = 0.0
    for b in range(B):
        n = mask[b].sum()
        seq_ratio = math.exp(sum((logps[b, t] - old[b, t]) * mask[b, t] for t in range(T)) / max(n, 1.0))
        row = 0.0
        for t in range(T):
            ratio = math.exp(logps[b, t] - old[b, t]) if spec.level == "token" else seq_ratio
            clipped = min(max(ratio, 1 - spec.epsilon_low), 1 + spec.epsilon_high)
            kl = math.exp(ref[b, t] - logps[b, t]) - (ref[b, t] - logps[b, t]) - 1
            row += (-min(ratio * adv[b], clipped * adv[b]) + spec.beta * kl) * mask[b, t]
        total += row / max(n, 1.0) / B if spec.aggregation == "sequence_mean" else row / mask.sum()
    loss, _ = policy_loss(*(jnp.asarray(x, jnp.float32) for x in (logps, old, ref, adv, mask)), spec,
                          global_normalizer(spec, mask))
    np.testing.assert_allclose(loss, total, rtol=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.level}-{s.aggregation}")
def test_no_old_logps_is_stop_gradient_of_logps(spec):
    logps, _, ref, adv, mask = loss_batch()
    n = global_normalizer(spec, mask)
    none = jax.value_and_grad(lambda lp: policy_loss(lp, None, ref, adv, mask, spec, n)[0])(logps)
    stopped = jax.value_and_grad(
        lambda lp: policy_loss(lp, jax.lax.stop_gradient(lp), ref, adv, mask, spec, n)[0])(logps)
    np.testing.assert_allclose(none[0], stopped[0], rtol=1e-7)
    np.testing.assert_allclose(none[1], stopped[1], rtol=1e-7)
    # Ratio 1: nothing is clipped.
    assert policy_loss(logps, None, ref, adv, mask, spec, n)[1]["clipped"] == 0


def test_beta_zero_ignores_the_reference():
    logps, old, ref, adv, mask = loss_batch()
    spec = PolicyLoss("token", "sequence_mean", 0.2, 0.2, beta=0.0)
    with_ref = jax.value_and_grad(lambda lp: policy_loss(lp, old, ref, adv, mask, spec, 7)[0])(logps)
    without = jax.value_and_grad(lambda lp: policy_loss(lp, old, None, adv, mask, spec, 7)[0])(logps)
    np.testing.assert_array_equal(with_ref[0], without[0])
    np.testing.assert_array_equal(with_ref[1], without[1])
    assert policy_loss(logps, old, None, adv, mask, spec, 7)[1]["kl"] == 0
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(logps, old, None, adv, mask, PolicyLoss("token", "sequence_mean", 0.2, 0.2, beta=0.1), 7)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.level}-{s.aggregation}")
def test_values_on_padding_do_not_matter(spec):
    """Whatever sits off the mask (here log-ratios whose exp overflows) changes nothing, NaN included."""
    logps, old, ref, adv, mask = loss_batch()
    off = mask == 0
    n = global_normalizer(spec, mask)
    clean = jax.value_and_grad(lambda lp: policy_loss(lp, old, ref, adv, mask, spec, n)[0])(logps)
    wild = jax.value_and_grad(lambda lp: policy_loss(lp, jnp.where(off, -500.0, old), jnp.where(off, 500.0, ref), adv,
                                                     mask, spec, n)[0])(jnp.where(off, 0.0, logps))
    np.testing.assert_allclose(wild[0], clean[0], rtol=1e-6)
    np.testing.assert_allclose(wild[1], clean[1], rtol=1e-6, atol=1e-8)
