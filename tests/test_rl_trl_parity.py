"""Our GRPO / DAPO / GSPO against TRL's GRPOTrainer on one batch: advantages, old and reference
log-probs, the KL and clip-ratio metrics, the loss and the gradient of every weight.

Reference: trl==1.16.0 (the `test` extra pins it), `GRPOTrainer._generate_and_score_completions`
(sampling, rewards, advantages with scale_rewards="group", old and reference per-token log-probs)
and `GRPOTrainer._compute_loss` (loss_type "grpo" / "dapo", importance_sampling_level "token" /
"sequence"). TRL runs a tiny Qwen2 in torch; we load the same weights (saved by TRL's models) with
mllm_jax.models.hf and compute everything with mllm_jax.rl on TRL's completions.

Setup: the policy is the reference plus noise when it samples, and more noise when the loss is
taken (as after an update within one rollout, num_iterations=2), so ratios differ from 1 and get
clipped; the EOS token is made likely, so some completions end early and masks have zeros.
TRL's use_bias_correction_kl (default True in 1.16) multiplies the KL by the ratio; our KL is the
plain k3 of MiniOneRec and DeepSeekMath, so it is turned off here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from trl import GRPOConfig, GRPOTrainer

from mllm_jax.models import hf
from mllm_jax.models.qwen2 import Qwen2
from mllm_jax.rl.algorithms import ALGORITHMS
from mllm_jax.rl.logprobs import completion_logps
from mllm_jax.rl.losses import policy_loss
from mllm_jax.runtime import make_mesh

PROMPTS = ["The user has interacted with items", "Tell me the title", "Can you recommend the next item"]
TARGETS = ["mod 5", "mod 5", "*"]  # "*": every completion gets the same reward (advantages 0)
G, C = 4, 8
TEMPERATURE = 0.9
BETA = 0.04
TOL = 1e-5
EOS_BOOST = 4.0  # the EOS logit along the mean hidden state: about a third of the completions end early
GEN_NOISE, LOSS_NOISE = 0.004, 0.01  # std of noise added to the weights (std 0.02) before sampling, before the loss


def toy_reward(groups: list[list[str]], targets: list[str]) -> np.ndarray:
    """An rl.rewards.RewardFn of the decoded text, with ties: the sum of its code points mod 5, or
    1 for target "*"."""
    return np.array([[1.0 if t == "*" else sum(map(ord, c)) % 5 for c in g] for g, t in zip(groups, targets)],
                    np.float32)


def trl_reward(prompts: list[str], completions: list[str], target: list[str], **_) -> list[float]:
    """toy_reward as TRL calls reward functions: flat lists, G consecutive completions per prompt."""
    groups = [completions[i:i + G] for i in range(0, len(completions), G)]
    return toy_reward(groups, target[::G]).ravel().tolist()


def perturb(model: torch.nn.Module, scale: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


@pytest.fixture(scope="module")
def base_model(tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2 with its EOS embedding along the mean final hidden state of the prompts and
    random continuations (tied head), so that about a third of the completions end early."""
    out = tmp_path_factory.mktemp("parity") / "base"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen2)
    prompts = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(0)
    ids = torch.cat([prompts.input_ids, torch.randint(3, model.config.vocab_size, (len(PROMPTS), C))], 1)
    mask = torch.cat([prompts.attention_mask, torch.ones(len(PROMPTS), C, dtype=torch.long)], 1)
    with torch.no_grad():
        mean = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()].mean(0)
        model.model.embed_tokens.weight[tokenizer.eos_token_id] = EOS_BOOST * mean / mean.norm() ** 2
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_qwen2 / name, out / name)
    return out


def run_trl(base: Path, tmp: Path, name: str) -> dict:
    """One TRL generation + loss step; returns its batch, loss, gradients, metrics and the policy's
    weights at generation (tmp/gen) and at the loss (tmp/loss)."""
    algo = ALGORITHMS[name]
    args = GRPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=len(PROMPTS) * G, num_generations=G,
                      max_completion_length=C, temperature=TEMPERATURE, beta=BETA,
                      loss_type="dapo" if algo.aggregation == "token_mean" else "grpo",
                      importance_sampling_level=algo.level, epsilon=algo.epsilon_low,
                      epsilon_high=algo.epsilon_high, use_bias_correction_kl=False, num_iterations=2,
                      report_to="none", use_cpu=True, bf16=False, seed=0)
    trainer = GRPOTrainer(model=str(base), reward_funcs=trl_reward, args=args,
                          train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS, "target": TARGETS}),
                          processing_class=transformers.AutoTokenizer.from_pretrained(base))
    torch.manual_seed(0)
    perturb(trainer.model, GEN_NOISE)
    trainer.model.save_pretrained(tmp / "gen")
    trainer.model.train()
    out = trainer._generate_and_score_completions(
        [{"prompt": p, "target": t} for p, t in zip(PROMPTS, TARGETS) for _ in range(G)])
    perturb(trainer.model, LOSS_NOISE)
    trainer.model.save_pretrained(tmp / "loss")
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer._compute_loss(trainer.model, out)
    loss.backward()
    texts = trainer.processing_class.batch_decode(
        [ids[m.bool()].tolist() for ids, m in zip(out["completion_ids"], out["completion_mask"])],
        skip_special_tokens=True)
    return {"out": {k: v.detach().numpy() if torch.is_tensor(v) else v for k, v in out.items()},
            "loss": loss.item(), "texts": texts, "metrics": {k: v[-1] for k, v in trainer._metrics["train"].items()},
            "grads": {n: p.grad.numpy() for n, p in trainer.model.named_parameters()}}


def load(model_dir: Path):
    mesh = make_mesh("1,1,1", jax.devices()[:1])
    params, cfg = hf.load_params(model_dir, hf.load_config(model_dir), mesh, np.float32)
    return cfg, params


def torch_layout(path: tuple[str, ...], grad: np.ndarray, vocab_size: int) -> np.ndarray:
    """Our gradient in the layout of the torch weight hf.hf_name(path) names."""
    grad = np.asarray(grad)
    if path[-1] == "kernel":
        grad = grad.T  # our kernels are (in, out), torch's Linear weight is (out, in)
    return grad[:vocab_size] if path[-1] == "embedding" else grad  # drop the vocab padding rows


class Diffs:
    """Compares with TRL within TOL and keeps the largest absolute difference of each quantity,
    printed at the end of a test (pytest -s shows them)."""

    def __init__(self):
        self.max: dict[str, float] = {}

    def check(self, what: str, ours, theirs) -> None:
        ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
        assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
        diff = float(np.max(np.abs(ours - theirs), initial=0.0))
        self.max[what] = max(self.max.get(what, 0.0), diff)
        assert diff <= TOL, f"{what}: max abs difference {diff:.3g} > {TOL}"


@pytest.mark.parametrize("name", ["grpo", "dapo", "gspo"])
def test_loss_advantages_kl_and_gradients_equal_trl(base_model: Path, tmp_path: Path, name: str):
    trl_step = run_trl(base_model, tmp_path, name)
    out, algo, diffs = trl_step["out"], ALGORITHMS[name], Diffs()
    N = len(PROMPTS)
    mask = out["completion_mask"].astype(np.float32)
    B, T = mask.shape
    assert not mask.all() and mask[:, -1].any(), "some completions should end early (EOS), some run to the limit"

    # Advantages from the same rewards of the same decoded completions.
    groups = [trl_step["texts"][i * G:(i + 1) * G] for i in range(N)]
    advantages = algo.advantages(toy_reward(groups, TARGETS)).reshape(B)
    diffs.check("advantages", advantages, out["advantages"])
    assert np.all(advantages[-G:] == 0) and np.any(advantages != 0)

    cfg, gen_params = load(tmp_path / "gen")
    _, loss_params = load(tmp_path / "loss")
    _, ref_params = load(base_model)
    model = Qwen2(cfg)
    prompt_ids, prompt_mask = out["prompt_ids"][::G], out["prompt_mask"][::G]  # TRL repeats each prompt G times
    completions = jnp.asarray(out["completion_ids"].reshape(N, G, T))

    def logps(params):
        return completion_logps(model, params, prompt_ids, prompt_mask, completions, TEMPERATURE).reshape(B, T)

    old, ref = jax.jit(logps)(gen_params), jax.jit(logps)(ref_params)
    diffs.check("old logps", old * mask, out["old_per_token_logps"] * mask)
    diffs.check("ref logps", ref * mask, out["ref_per_token_logps"] * mask)

    spec = algo.policy_loss(BETA)
    normalizer = mask.sum() if spec.aggregation == "token_mean" else B
    if spec.aggregation == "token_mean":
        assert normalizer == out["num_items_in_batch"]

    def loss_fn(params):
        return policy_loss(logps(params), old, ref, jnp.asarray(advantages), jnp.asarray(mask), spec, normalizer)

    (loss, sums), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(loss_params)
    diffs.check("loss", loss, trl_step["loss"])
    metrics = trl_step["metrics"]
    diffs.check("kl", sums["kl"] / sums["tokens"], metrics["kl"])
    clip_count = sums["tokens"] if spec.level == "token" else sums["sequences"]
    diffs.check("clip ratio", sums["clipped"] / clip_count, metrics["clip_ratio/region_mean"])
    assert metrics["kl"] > 0 and metrics["clip_ratio/region_mean"] > 0, "the test should exercise the KL and clipping"

    torch_grads = trl_step["grads"]
    compared = set()
    for path, grad in jax.tree_util.tree_flatten_with_path(grads)[0]:
        keys = tuple(str(k.key) for k in path)
        torch_name = hf.hf_name(keys)
        diffs.check("gradients", torch_layout(keys, grad, cfg.vocab_size), torch_grads[torch_name])
        compared.add(torch_name)
    assert compared == set(torch_grads)  # every weight, the tied embedding/head once
    largest = max(np.abs(g).max() for g in torch_grads.values())
    print(f"\n{name}: max abs differences to TRL", {k: f"{v:.2g}" for k, v in diffs.max.items()},
          f"(largest gradient {largest:.2g}, loss {trl_step['loss']:.4g}, kl {metrics['kl']:.3g}, "
          f"clip ratio {metrics['clip_ratio/region_mean']:.3g})")
