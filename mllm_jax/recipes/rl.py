"""MiniOneRec's RL stage: the GRPO family on a SID model, rollouts by constrained beam search.

Starts from an SFT export (`runs/<sft run>/hf`) or any HF checkpoint with the SID tokens. Each
step takes `train.prompts_per_step` prompts of MiniOneRec's RL datasets (data/sid_rl.py) and, per
prompt, a group of `rl.num_generations` completions: the constrained beam search's beams (MiniOneRec's
`beam_search: true`) or constrained samples at `rl.temperature`. Rewards (rl/rewards.py) compare them
with the prompt's SID; the algorithm (rl/algorithms.py: grpo, dapo, gspo, rloo, reinforce++) turns
them into advantages and a clipped policy loss with a k3 KL to a reference model (rl/losses.py),
sharded like the policy. `rl.num_iterations` updates reuse one rollout batch (TRL's mu), the ratio
then taken against the rollout's policy. Evaluations run the SFT recipe's SID evaluation.

A step = one rollout batch and its `rl.num_iterations` optimizer updates. Rollouts are a function
of (seed, step) and the state, so `--resume` continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax import optim, runtime
from mllm_jax.config import ConfigError, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from mllm_jax.contracts import RlSummary
from mllm_jax.data import sid, sid_rl
from mllm_jax.eval.beam_search import BeamSearch, left_pad
from mllm_jax.eval.sid_eval import SidEvalConfig, evaluate_sids, padded_length
from mllm_jax.eval.sid_trie import SidTrie, build_trie
from mllm_jax.models import hf, qwen2
from mllm_jax.optim import OptimizerConfig
from mllm_jax.rl import rewards
from mllm_jax.rl.algorithms import ALGORITHMS, dynamic_sampling_keep
from mllm_jax.rl.logprobs import completion_logps
from mllm_jax.rl.losses import PolicyLoss, policy_loss
from mllm_jax.runtime import JaxConfig
from mllm_jax.tracking import Console, WandbConfig
from mllm_jax.trainer import LoopConfig

if TYPE_CHECKING:
    from mllm_jax.preflight import Plan


@dataclass
class RlConfig:
    """The `rl:` section: rollouts, rewards and the algorithm (MiniOneRec's rl.sh values by default)."""

    algorithm: Literal["grpo", "dapo", "gspo", "rloo", "reinforce++"] = "grpo"
    """What turns rewards into a loss (rl/algorithms.py): its advantages, clip range, loss averaging."""
    num_generations: PositiveInt = 16
    """Completions per prompt (the group; MiniOneRec: 16), at least 2."""
    beam_search: bool = True
    """Rollouts by the constrained beam search (the group = its beams, best first; MiniOneRec's
    default), or false: constrained sampling at `temperature`."""
    temperature: PositiveFloat = 1.0
    """Of the rollouts and of the log-probs in the loss (TRL divides the logits by it)."""
    reward: str = "ranking"
    """A name of rl/rewards.py's registry: rule (exact match), ranking (rule + MiniOneRec's NDCG-style
    penalty of ranked misses, its rl.sh choice), ranking_only."""
    beta: NonNegativeFloat = 1e-3
    """Weight of the k3 KL to the reference model (rl.sh: 1e-3); 0 = no reference model."""
    num_iterations: PositiveInt = 1
    """Updates per rollout batch (TRL's num_iterations); above 1 the ratio to the rollout's policy
    is clipped to [1 - epsilon, 1 + epsilon_high]."""
    epsilon: NonNegativeFloat | None = None
    """Lower clip range; None = the algorithm's (0.2; gspo 3e-4)."""
    epsilon_high: NonNegativeFloat | None = None
    """Upper clip range; None = the algorithm's (0.2; dapo 0.28; gspo 4e-4)."""
    dynamic_sampling: bool | None = None
    """Leave out of the loss the groups whose rewards are all equal (DAPO); None = the algorithm's."""
    ref_sync_steps: NonNegativeInt = 0
    """Every N steps move the reference toward the policy, ref = alpha * policy + (1 - alpha) * ref
    (TRL's sync_ref_model, on in MiniOneRec's rl.sh with TRL's 512 steps); 0 = a frozen reference."""
    ref_sync_alpha: PositiveFloat = 0.6
    """alpha of ref_sync_steps (TRL's ref_model_mixup_alpha), in (0, 1]."""

    def validate(self) -> None:
        if self.num_generations < 2:
            raise ConfigError(f"rl.num_generations: expected at least 2 (advantages compare a group), "
                              f"got {self.num_generations}")
        rewards.get(self.reward)
        if self.ref_sync_alpha > 1:
            raise ConfigError(f"rl.ref_sync_alpha: expected a number in (0, 1], got {self.ref_sync_alpha}")
        if self.epsilon is not None and self.epsilon >= 1:
            raise ConfigError(f"rl.epsilon: expected a number in [0, 1) (the ratio is clipped at 1 - epsilon, which "
                              f"must stay above 0), got {self.epsilon}")

    def policy_loss(self) -> PolicyLoss:
        algo = ALGORITHMS[self.algorithm]
        return dataclasses.replace(
            algo.policy_loss(self.beta),
            epsilon_low=algo.epsilon_low if self.epsilon is None else self.epsilon,
            epsilon_high=algo.epsilon_high if self.epsilon_high is None else self.epsilon_high)

    def filters_groups(self) -> bool:
        return ALGORITHMS[self.algorithm].dynamic_sampling if self.dynamic_sampling is None else self.dynamic_sampling


@dataclass
class TrainConfig(LoopConfig, OptimizerConfig):
    prompts_per_step: PositiveInt = 64
    """Prompts per step, each with num_generations completions (MiniOneRec's rl.sh: 64 x 16 per
    optimizer step: 64 completions per GPU x 8 GPUs x 2 accumulation steps, 16 per prompt)."""
    per_device_prompts: PositiveInt = 1
    """Prompts per data-parallel device in one micro-batch (rollout and update); the step's prompts
    are done in prompts_per_step / (per_device_prompts x data-parallel devices) micro-batches."""
    learning_rate: PositiveFloat = 1e-5
    warmup_steps: NonNegativeInt = 0
    """Warmup updates; 0 = warmup_ratio of all updates."""
    warmup_ratio: NonNegativeFloat = 0.03
    """Used when warmup_steps is 0: that fraction of the run's updates, rounded up (rl.sh: 0.03)."""
    grad_clip: NonNegativeFloat = 0.3
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """After the warmup, as Hugging Face's schedules (rl.sh: cosine)."""
    max_steps: PositiveInt | None = None
    """Steps in total; None = num_train_epochs over the prompts."""
    num_train_epochs: PositiveFloat = 2.0
    """Epochs when max_steps is None (rl.sh: 2)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass of the update."""
    scan_layers: bool = True
    """One compiled decoder layer in the update's forward/backward (values unchanged)."""

    def warmup(self, updates: int) -> int:
        return self.warmup_steps or math.ceil(self.warmup_ratio * updates)


@dataclass
class Config:
    base_model: str | None = None
    """An SFT export (runs/<sft run>/hf) or any Hugging Face model (directory or hub id) with the SID
    tokens; missing SID tokens are added (new embedding rows at the mean), as in sft."""
    output_dir: str | None = None
    """Run directory; None = runs/rl-<UTC time>-<short sha>."""
    seed: NonNegativeInt = 42
    """Prompt sampling and order, and sampled rollouts."""
    export_hf: bool = True
    """Write the policy to <run dir>/hf as HF safetensors + config + tokenizer."""
    data: sid_rl.RlDataConfig = field(default_factory=sid_rl.RlDataConfig)
    tasks: sid_rl.RlTasksConfig = field(default_factory=sid_rl.RlTasksConfig)
    rl: RlConfig = field(default_factory=RlConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: SidEvalConfig = field(default_factory=SidEvalConfig)
    """The SID evaluation of data.test_file at every evaluation (as sft's train_eval)."""
    jax: JaxConfig = field(default_factory=JaxConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        if not self.base_model:
            raise ConfigError("base_model: expected an SFT export (runs/<run>/hf), a Hugging Face model id or a "
                              "local model directory")
        if self.train.selects_best:
            if not self.train.best_metric.startswith(("eval/hr@", "eval/ndcg@")) or not self.data.test_file:
                raise ConfigError(f"train.best_metric {self.train.best_metric}: rl evaluates only SIDs; use e.g. "
                                  "eval/ndcg@10 with data.test_file")
            self.eval.check_selects(self.train.best_metric)


@dataclass
class Prepared:
    """Everything read from disk before the run starts (bad input fails here)."""

    opened: hf.OpenedModel
    prompts: list[sid_rl.RlPrompt]
    prompt_ids: list[np.ndarray]
    test: list[sid.TestPrompt]
    test_ids: list[np.ndarray]
    trie: SidTrie


def _completions(sids: jax.Array, suffix: jax.Array) -> jax.Array:
    """(..., G, depth) SID tokens (-1 for a dead beam) -> (..., G, depth + len(suffix)) completion
    tokens: the SID, then the forced "\\n" + EOS (a dead beam's tokens are 0s, masked out)."""
    tail = jnp.broadcast_to(suffix, sids.shape[:-1] + suffix.shape)
    return jnp.concatenate([jnp.maximum(sids, 0), tail], axis=-1)


class RlPrograms:
    """rl's math from the model config and the SID trie alone (no weights): rollouts, the scoring
    forward (reference / rollout-policy log-probs) and the update over one step's micro-batches,
    with the state's shardings. The Task runs them; preflight compiles them for a TPU topology."""

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh, model_cfg: qwen2.Qwen2Config, trie: SidTrie,
                 max_steps: int):
        t, r = cfg.train, cfg.rl
        self.cfg, self.mesh, self.model_cfg = cfg, mesh, model_cfg
        self.micro = t.per_device_prompts * runtime.data_parallel_size(mesh)
        self.accum = t.prompts_per_step // self.micro
        self.G, self.depth = r.num_generations, trie.depth
        self.suffix = np.asarray(trie.suffix, np.int32)
        self.C = trie.depth + len(self.suffix)
        self.spec = r.policy_loss()
        param_dtype = jnp.dtype(cfg.jax.param_dtype)
        self.model = qwen2.Qwen2(model_cfg, dtype=jnp.dtype(cfg.jax.compute_dtype), param_dtype=param_dtype,
                                 remat=t.gradient_checkpointing, scan_layers=t.scan_layers, mesh=mesh)
        self.updates = max(max_steps, 1) * r.num_iterations
        self.schedule = optim.warmup_decay(t.learning_rate, t.warmup(self.updates), self.updates, t.lr_schedule)
        self.tx = t.build(self.schedule)
        shapes = hf.abstract_params(model_cfg, param_dtype)
        params = jax.tree.map(lambda spec: NamedSharding(mesh, spec), qwen2.param_specs(shapes, mesh))
        replicated = runtime.replicated(mesh)
        opt_state = optax.tree_map_params(self.tx, lambda _, sharding: sharding, jax.eval_shape(self.tx.init, shapes),
                                          params, transform_non_params=lambda _: replicated,
                                          is_leaf=lambda x: isinstance(x, NamedSharding))
        self.state_shardings = {"step": replicated, "params": params, "opt_state": opt_state}
        abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": shapes,
                    "opt_state": jax.eval_shape(self.tx.init, shapes)}
        if r.beta > 0:  # the reference model, sharded like the policy (and checkpointed: it may move)
            self.state_shardings["ref_params"], abstract["ref_params"] = params, shapes
        self.abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                           abstract, self.state_shardings)
        self.rollout = BeamSearch(self.model, trie, r.num_generations, mesh, r.temperature,
                                  sample=not r.beam_search)
        self.score = jax.jit(self._logps)
        """The scoring forward: reference (and rollout-policy) log-probs of a micro-batch."""
        self.update = jax.jit(self._update, donate_argnums=0, out_shardings=(self.state_shardings, None))
        self.sync_ref = jax.jit(self._sync_ref, donate_argnums=0, out_shardings=self.state_shardings)

    def batch_spec(self, micro_batches: bool) -> NamedSharding:
        return NamedSharding(self.mesh, P(None, runtime.BATCH_AXES) if micro_batches else P(runtime.BATCH_AXES))

    def abstract_batch(self, seq: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The shapes of one step's update batch (accumulation x micro-batch x ...)."""
        s, (A, M, G) = self.batch_spec(True), (self.accum, self.micro, self.G)
        out = {"ids": ((A, M, seq), jnp.int32), "mask": ((A, M, seq), jnp.bool_),
               "sids": ((A, M, G, self.depth), jnp.int32), "advantages": ((A, M, G), jnp.float32),
               "weights": ((A, M, G), jnp.float32)}
        if self.cfg.rl.beta > 0:
            out["ref"] = ((A, M, G, self.C), jnp.float32)
        if self.cfg.rl.num_iterations > 1:
            out["old"] = ((A, M, G, self.C), jnp.float32)
        return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=s) for k, (shape, dtype) in out.items()}

    def _logps(self, params: Any, ids: jax.Array, mask: jax.Array, sids: jax.Array) -> jax.Array:
        """(M, G, C) log-probs of one micro-batch's completions (SIDs + suffix) under `params`."""
        return completion_logps(self.model, params, ids, mask, _completions(sids, jnp.asarray(self.suffix)),
                                self.cfg.rl.temperature)

    def _update(self, state: dict[str, Any], batch: dict[str, jax.Array],
                normalizer: jax.Array) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        """One optimizer update over a step's micro-batches; `normalizer` is the whole step's count
        (sequences or tokens, see PolicyLoss), so the summed micro-batch losses are the step's."""
        params, G, C = state["params"], self.G, self.C

        def loss_fn(p: Any, mb: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
            M = mb["ids"].shape[0]
            logps = self._logps(p, mb["ids"], mb["mask"], mb["sids"]).reshape(M * G, C)
            mask = jnp.broadcast_to(mb["weights"][..., None], (M, G, C)).reshape(M * G, C)
            flat = lambda k: mb[k].reshape(M * G, C) if k in mb else None  # noqa: E731
            return policy_loss(logps, flat("old"), flat("ref"), mb["advantages"].reshape(M * G), mask, self.spec,
                               normalizer)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def micro_step(carry: tuple, mb: dict[str, jax.Array]) -> tuple[tuple, None]:
            loss_sum, sums, grads = carry
            (loss, s), g = grad_fn(params, mb)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return (loss_sum + loss, jax.tree.map(jnp.add, sums, s), grads), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
        zeros = jax.lax.with_sharding_constraint(zeros, self.state_shardings["params"])
        sums0 = {k: jnp.float32(0) for k in ("kl", "clipped", "tokens", "sequences")}  # policy_loss's sums
        (loss, sums, grads), _ = jax.lax.scan(micro_step, (jnp.float32(0), sums0, zeros), batch)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        new_state = {**state, "step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads), **sums}

    def _sync_ref(self, state: dict[str, Any]) -> dict[str, Any]:
        a = self.cfg.rl.ref_sync_alpha
        ref = jax.tree.map(lambda p, r: (a * p.astype(jnp.float32) + (1 - a) * r.astype(jnp.float32)).astype(r.dtype),
                           state["params"], state["ref_params"])
        return {**state, "ref_params": ref}


class RLTask:
    """The trainer's Task for RL: a step is a rollout batch (its micro-batches through the rollout and
    the scoring forward), host-side rewards and advantages, then rl.num_iterations updates."""

    console_metrics = {"rl/reward_mean": "reward {:.4f}", "rl/hit_rate": "hit {:.3f}", "rl/kl": "kl {:.2e}",
                       "perf/rollout_sec": "rollout {:.2f} s", "perf/update_sec": "update {:.2f} s"}

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh, prep: Prepared):
        self.cfg, self.mesh, self.prep, t = cfg, mesh, prep, cfg.train
        self.steps_per_epoch = math.ceil(len(prep.prompts) / t.prompts_per_step)
        self.max_steps = t.max_steps or math.ceil(t.num_train_epochs * self.steps_per_epoch)
        self.model_cfg = prep.opened.weights.cfg
        self.programs = p = RlPrograms(cfg, mesh, self.model_cfg, prep.trie, self.max_steps)
        self.seq = min(padded_length(max(len(x) for x in prep.prompt_ids)), padded_length(cfg.data.max_prompt_len))
        self.reward = rewards.get(cfg.rl.reward)
        self.algorithm = ALGORITHMS[cfg.rl.algorithm]
        params = hf.place_params(prep.opened.weights, mesh, jnp.dtype(cfg.jax.param_dtype))
        opt_state = jax.jit(p.tx.init, out_shardings=p.state_shardings["opt_state"])(params)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state}
        if cfg.rl.beta > 0:
            state["ref_params"] = jax.tree.map(jnp.copy, params)
        self.state = jax.device_put(state, p.state_shardings)
        self.search = BeamSearch(p.model, prep.trie, cfg.eval.num_beams, mesh) if prep.test else None
        self._update = runtime.CompiledStep(p.update)
        passes = 1 + (cfg.rl.beta > 0) + (cfg.rl.num_iterations > 1) + 3 * cfg.rl.num_iterations
        self.flops_per_token = qwen2.flops_per_token(self.model_cfg, self.seq) / 3 * passes
        """Forward (2 FLOPs a weight) for the rollout and each scoring pass, forward + backward for each
        update, per token of prompt and completion (approximate: decoding is counted as one pass)."""
        self._key = jax.random.key(cfg.seed)

    # --- the Task protocol -----------------------------------------------------------------
    @property
    def step_memory(self) -> dict[str, int] | None:
        return self._update.memory

    def learning_rate(self, step: int) -> float:
        return float(self.programs.schedule(step * self.cfg.rl.num_iterations))

    def tokens(self, step: int) -> int:
        return self.cfg.train.prompts_per_step * (self.seq + self.programs.G * self.programs.C)

    def _global(self, array: np.ndarray, micro_batches: bool) -> jax.Array:
        """A host array every process holds whole, as a global array split over the batch axes."""
        return jax.make_array_from_callback(array.shape, self.programs.batch_spec(micro_batches),
                                            lambda index: array[index])

    def train_step(self, state: dict[str, Any], step: int) -> tuple[dict[str, Any], dict[str, float]]:
        p, r, prep = self.programs, self.cfg.rl, self.prep
        idx = runtime.step_indices(len(prep.prompts), self.cfg.train.prompts_per_step, self.cfg.seed, step)
        idx = idx.reshape(p.accum, p.micro)
        ids, mask = left_pad([prep.prompt_ids[max(i, 0)] for i in idx.reshape(-1)], self.seq, prep.opened.eos_id)
        ids, mask = ids.reshape(p.accum, p.micro, -1), mask.reshape(p.accum, p.micro, -1)

        started = time.perf_counter()
        key = jax.random.fold_in(self._key, step)
        out: dict[str, list[np.ndarray]] = {"sids": [], "ref": [], "old": []}
        for a in range(p.accum):
            g_ids, g_mask = self._global(ids[a], False), self._global(mask[a], False)
            sids, _ = p.rollout(state["params"], g_ids, g_mask, jax.random.fold_in(key, a))
            out["sids"].append(runtime.to_host(sids))
            if r.beta > 0:
                out["ref"].append(runtime.to_host(p.score(state["ref_params"], g_ids, g_mask, sids)))
            if r.num_iterations > 1:
                out["old"].append(runtime.to_host(p.score(state["params"], g_ids, g_mask, sids)))
        rollout_sec = time.perf_counter() - started

        sids = np.stack(out["sids"])  # (A, M, G, depth)
        real = idx >= 0
        groups = [[prep.trie.decode(beam) for beam in sids[a, m]] for a, m in zip(*np.nonzero(real))]
        targets = [prep.prompts[i].target for i in idx[real]]
        reward = np.asarray(self.reward(groups, targets), np.float32)  # (n real prompts, G)
        advantages, weights = np.zeros(idx.shape + (p.G,), np.float32), np.zeros(idx.shape + (p.G,), np.float32)
        advantages[real] = self.algorithm.advantages(reward)
        keep = dynamic_sampling_keep(reward) if self.cfg.rl.filters_groups() else np.ones(len(reward), bool)
        weights[real] = keep[:, None] & (sids[real][..., 0] >= 0)  # dead beams (too few items) count for nothing
        normalizer = weights.sum() * (p.C if p.spec.aggregation == "token_mean" else 1)

        started = time.perf_counter()
        batch = {"ids": ids, "mask": mask, "sids": sids, "advantages": advantages, "weights": weights,
                 **{k: np.stack(v) for k, v in out.items() if k != "sids" and v}}
        batch = {k: self._global(v, True) for k, v in batch.items()}
        sums: dict[str, float] = {}
        losses = []
        for _ in range(r.num_iterations):
            state, m = self._update(state, batch, np.float32(max(normalizer, 1.0)))
            m = jax.device_get(m)
            losses.append(float(m["loss"]))
            for k in ("kl", "clipped", "tokens", "sequences"):
                sums[k] = sums.get(k, 0.0) + float(m[k])
        if r.ref_sync_steps and r.beta > 0 and (step + 1) % r.ref_sync_steps == 0:
            state = p.sync_ref(state)
        update_sec = time.perf_counter() - started

        completions = [c for g in groups for c in g]
        hits = [target in group for group, target in zip(groups, targets)]
        clip_base = sums["tokens"] if p.spec.level == "token" else sums["sequences"]
        return state, {
            "loss": float(np.mean(losses)), "grad_norm": float(m["grad_norm"]),
            "rl/reward_mean": float(reward.mean()),
            "rl/reward_std": float(np.mean(reward.std(axis=1, ddof=1))),
            "rl/kl": sums["kl"] / max(sums["tokens"], 1.0),
            "rl/clip_frac": sums["clipped"] / max(clip_base, 1.0),
            "rl/hit_rate": float(np.mean(hits)),
            "rl/valid_frac": float(np.mean([c in prep.trie.valid for c in completions])),
            "rl/kept_groups": float(keep.mean()),
            "perf/rollout_sec": rollout_sec, "perf/update_sec": update_sec,
        }

    def evaluate(self, state: dict[str, Any]) -> dict[str, float]:
        """The SID evaluation of data.test_file (HR@K / NDCG@K of eval.num_beams beams)."""
        if self.search is None:
            return {}
        return evaluate_sids(self.search, state["params"], self.prep.test_ids, [p.target for p in self.prep.test],
                             self.cfg.eval, self.mesh, self.prep.opened.eos_id, Path(self.cfg.output_dir),
                             int(jax.device_get(state["step"])))

    def finish(self, state: dict[str, Any], console: Console) -> RlSummary:
        t, p = self.cfg.train, self.programs
        out: RlSummary = {
            "base_model": self.cfg.base_model,
            "num_params": qwen2.num_params(state["params"]),
            "token_extension": self.prep.opened.token_extension | {"padded_vocab_size": self.model_cfg.padded_vocab_size},
            "algorithm": self.cfg.rl.algorithm,
            "train_prompts": {task: sum(q.task == task for q in self.prep.prompts) for task in sid_rl.RL_TASKS},
            "test_prompts": len(self.prep.test),
            "prompt_len": self.seq,
            "effective_batch": {"prompts_per_step": t.prompts_per_step, "per_device_prompts": t.per_device_prompts,
                                "data_parallel_devices": runtime.data_parallel_size(self.mesh),
                                "micro_batches": p.accum, "num_generations": p.G,
                                "completions_per_step": t.prompts_per_step * p.G},
            "steps_per_epoch": self.steps_per_epoch,
            "max_steps": self.max_steps,
            "updates": self.max_steps * self.cfg.rl.num_iterations,
        }
        if self.cfg.export_hf:
            hf_dir = Path(self.cfg.output_dir) / "hf"
            hf.save_pretrained(hf_dir, state["params"], self.model_cfg, self.prep.opened.tokenizer,
                               self.prep.opened.model_dir)
            out["hf_export_dir"] = str(hf_dir.absolute())
            console.print(f"exported the policy to {hf_dir}")
        return out


def _check_batch(cfg: Config, mesh: jax.sharding.Mesh) -> None:
    t = cfg.train
    micro = t.per_device_prompts * runtime.data_parallel_size(mesh)
    if t.prompts_per_step % micro:
        raise ConfigError(f"train.prompts_per_step={t.prompts_per_step} is not divisible by per_device_prompts x "
                          f"data-parallel devices = {t.per_device_prompts} x {runtime.data_parallel_size(mesh)}")


def prepare(cfg: Config, mesh: jax.sharding.Mesh) -> Prepared:
    """Read and check the model files and the data; raises ConfigError on bad input."""
    _check_batch(cfg, mesh)
    index = sid.load_index(cfg.data.sid_index_path)
    if (note := sid.collisions(index)) and jax.process_index() == 0:
        print(note, flush=True)
    opened = hf.open_with_tokens(cfg.base_model, sid.sid_tokens(index), mesh)
    prompts = sid_rl.build_rl_prompts(cfg.data, cfg.tasks, cfg.seed)
    if not prompts:
        raise ConfigError("data: no RL prompts (every enabled task sampled none)")
    prompt_ids = sid_rl.tokenize_prompts(prompts, opened.tokenizer, cfg.data.max_prompt_len)
    test, test_ids = [], []
    if cfg.data.test_file:
        test = sid.build_test_prompts(cfg.data.test_file, cfg.data.sid_index_path, cfg.data.sample_test, cfg.seed)
        test_ids = sid.tokenize_prompts(test, opened.tokenizer, cfg.data.max_prompt_len)
    trie = build_trie(index, opened.tokenizer, opened.eos_id)
    return Prepared(opened, prompts, prompt_ids, test, test_ids, trie)


def build(cfg: Config, mesh: jax.sharding.Mesh) -> Callable[[], RLTask]:
    """Check the input before the run starts; the returned function builds the Task."""
    prep = prepare(cfg, mesh)
    return lambda: RLTask(cfg, mesh, prep)


def preflight(cfg: Config, mesh: jax.sharding.Mesh) -> "Plan":
    """rl's programs on abstract arguments, from config.json, the tokenizer and the SID index (its
    tokens and trie make the vocabulary and the rollout's tables): the update over one step, one
    micro-batch's rollout and scoring forward. Prompts are data.max_prompt_len tokens (the longest
    a step can have)."""
    from mllm_jax.preflight import Plan, Program

    _check_batch(cfg, mesh)
    t, r = cfg.train, cfg.rl
    index = sid.load_index(cfg.data.sid_index_path)
    model_dir, model_cfg, tokenizer = hf.config_with_tokens(cfg.base_model, sid.sid_tokens(index), mesh)
    trie = build_trie(index, tokenizer, hf.eos_token_id(model_dir, tokenizer))
    programs = RlPrograms(cfg, mesh, model_cfg, trie, t.max_steps or 1)
    seq, micro = padded_length(cfg.data.max_prompt_len), programs.micro
    state = programs.abstract_state
    spec = programs.batch_spec(False)
    one = (jax.ShapeDtypeStruct((micro, seq), jnp.int32, sharding=spec),
           jax.ShapeDtypeStruct((micro, seq), jnp.bool_, sharding=spec),
           jax.ShapeDtypeStruct((micro, programs.G, programs.depth), jnp.int32, sharding=spec))
    tokens = t.prompts_per_step * (seq + programs.G * programs.C)
    normalizer = jax.ShapeDtypeStruct((), jnp.float32, sharding=runtime.replicated(mesh))
    plan = Plan([
        Program("update", programs.update, (state, programs.abstract_batch(seq), normalizer),
                model_flops=qwen2.flops_per_token(model_cfg, seq) * tokens,
                note=f"{programs.accum} micro-batches of {micro} prompts x {programs.G} completions of "
                     f"{programs.C} tokens after {seq}-token prompts"),
        Program("rollout", programs.rollout.jitted, programs.rollout.abstract_args(state["params"], micro, seq),
                note=f"{micro} prompts x {programs.G} {'beams' if r.beam_search else 'samples'}"),
        Program("score", programs.score, (state["params"], *one), note="reference / rollout-policy log-probs"),
    ], facts={"layers": model_cfg.num_hidden_layers, "hidden": model_cfg.hidden_size,
              "vocab": f"{model_cfg.padded_vocab_size} padded", "prompt": f"{seq} (data.max_prompt_len)",
              "micro_batch": micro, "accumulation": programs.accum, "generations": programs.G,
              "dtypes": f"params {cfg.jax.param_dtype}, compute {cfg.jax.compute_dtype}"})
    plan.knobs = [f"train.per_device_prompts (now {t.per_device_prompts}; the accumulation keeps "
                  "train.prompts_per_step)"]
    if not t.gradient_checkpointing:
        plan.knobs.append("train.gradient_checkpointing=true")
    if mesh.shape["fsdp"] == 1:
        plan.knobs.append("jax.mesh_shape=1,-1,1 (fsdp shards weights, the reference and optimizer state)")
    return plan
