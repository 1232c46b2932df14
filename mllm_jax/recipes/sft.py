"""Semantic-ID SFT (MiniOneRec): fine-tune a Qwen2-family model from Hugging Face weights on
next-item, item-alignment and fusion tasks written with SID tokens.

Wires the HF import (weights, tokenizer, SID tokens added), the SID data, and a jitted step
that accumulates gradients over the whole global batch into the shared train loop; evaluates
with the eval loss and (run_mode train_eval / eval) the constrained beam search over the SID
trie, HR@K / NDCG@K as MiniOneRec computes them; exports the fine-tuned model to HF files.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax import optim, runtime
from mllm_jax.checkpoint import Checkpointer
from mllm_jax.config import ConfigError, NonNegativeInt, PositiveFloat, PositiveInt
from mllm_jax.optim import OptimizerConfig
from mllm_jax.contracts import SftSummary
from mllm_jax.data import sid
from mllm_jax.eval.beam_search import BeamSearch, left_pad
from mllm_jax.eval.metrics import ranking_metrics, write_eval_files
from mllm_jax.eval.sid_trie import SidTrie, build_trie
from mllm_jax.models import hf, qwen2
from mllm_jax.runtime import JaxConfig
from mllm_jax.tracking import Console, WandbConfig
from mllm_jax.trainer import LoopConfig

SEQ_MULTIPLE = 64
"""Sequences are padded to the longest example of their split, rounded up to this: one
compiled step for the whole run, little padding."""


@dataclass
class TrainConfig(LoopConfig, OptimizerConfig):
    per_device_train_batch_size: PositiveInt = 4
    """Sequences per data-parallel device (dp x fsdp) in one micro-batch."""
    global_batch_size: PositiveInt = 128
    """Sequences per update; gradient accumulation = global / (per-device x data-parallel
    devices), which must divide exactly. The loss is the token mean over the global batch."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """After warmup (linear from 0): decay to 0 at the last step, or stay constant."""
    max_steps: PositiveInt | None = None
    """Updates in total; None = num_train_epochs over the training examples."""
    num_train_epochs: PositiveFloat = 1.0
    """Epochs when max_steps is None (the last batch of an epoch may be partial)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass: less memory, ~1/3 more compute."""
    loss_chunk_size: PositiveInt | None = None
    """Cross entropy over this many positions at a time: only one chunk's float32 logits
    (micro-batch x chunk x vocab) exist, not the whole sequence's, recomputed in the backward
    pass; same loss and gradients. None = all positions at once."""


@dataclass
class EvalConfig:
    """The SID evaluation: constrained beam search over the index's SIDs on data.test_file."""

    num_beams: PositiveInt = 50
    topk: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 20, 50])
    """K of HR@K and NDCG@K; each <= num_beams."""
    per_device_batch_size: PositiveInt = 1
    """Prompts per data-parallel device in one beam search (each carries num_beams sequences)."""
    checkpoint: str | None = None
    """With run_mode eval: an orbax checkpoint directory (a run's checkpoints/) whose latest step
    is evaluated; None = the base_model weights."""

    def validate(self) -> None:
        if not self.topk or any(k < 1 or k > self.num_beams for k in self.topk):
            raise ConfigError(f"eval.topk: expected values in 1..num_beams={self.num_beams}, got {self.topk}")


@dataclass
class Config:
    base_model: str | None = None
    """Hugging Face model id (downloaded) or a local directory with config.json, safetensors
    weights and tokenizer.json."""
    output_dir: str | None = None
    """Run directory; None = runs/sft-<UTC time>-<short sha>."""
    run_mode: Literal["train", "eval", "train_eval"] = "train"
    """train: SFT with the eval loss; train_eval: also the SID evaluation at every evaluation;
    eval: no training, only the evaluation (of base_model, eval.checkpoint, or --resume)."""
    seed: NonNegativeInt = 42
    export_hf: bool = True
    """Write the fine-tuned model to <run dir>/hf as HF safetensors + config + tokenizer."""
    data: sid.SidDataConfig = field(default_factory=sid.SidDataConfig)
    tasks: sid.TasksConfig = field(default_factory=sid.TasksConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    jax: JaxConfig = field(default_factory=JaxConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        if not self.base_model:
            raise ConfigError("base_model: expected a Hugging Face model id or a local model directory")
        if self.run_mode != "train" and not self.data.test_file:
            raise ConfigError(f"data.test_file: run_mode {self.run_mode} needs the CSV to evaluate on")
        if self.eval.checkpoint and self.run_mode != "eval":
            raise ConfigError("eval.checkpoint: only used with run_mode eval (training resumes with --resume)")


@dataclass
class Prepared:
    """Everything read from disk before the run starts (bad input fails here)."""

    model_dir: Path
    model_cfg: qwen2.Qwen2Config
    weights: hf.Weights
    """Opened and checked against model_cfg (memory-mapped: loaded when the Task is built)."""
    tokenizer: Any
    eos_id: int
    token_extension: dict[str, int]
    train: sid.TokenizedExamples | None
    """None with run_mode eval."""
    eval: sid.TokenizedExamples | None
    test: list[sid.TestPrompt]
    test_ids: list[np.ndarray]
    trie: SidTrie | None


def _padded_length(n: int) -> int:
    return -(-n // SEQ_MULTIPLE) * SEQ_MULTIPLE


def seq_len(examples: sid.TokenizedExamples, max_len: int) -> int:
    return min(max_len, _padded_length(examples.max_length()))


@functools.lru_cache(maxsize=2)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch (computed once per epoch, not once per step)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def step_indices(num_examples: int, global_batch_size: int, seed: int, step: int) -> np.ndarray:
    """Example indices of update `step` (-1 = empty filler row): a pure function of (seed,
    step), so a resumed run sees the same batches. Each epoch is a fresh permutation and
    its last batch may be partial."""
    steps_per_epoch = math.ceil(num_examples / global_batch_size)
    epoch, pos = divmod(step, steps_per_epoch)
    chunk = _epoch_order(num_examples, seed, epoch)[pos * global_batch_size:(pos + 1) * global_batch_size]
    return np.concatenate([chunk, np.full(global_batch_size - len(chunk), -1)])


class SFTTask:
    """The trainer's Task for SID SFT: params sharded by qwen2.param_specs, batches of shape
    (accumulation, micro-batch, seq) split over (dp, fsdp) on the micro-batch axis."""

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh, prep: Prepared):
        self.cfg, self.mesh, self.prep, t = cfg, mesh, prep, cfg.train
        self.micro = t.per_device_train_batch_size * runtime.data_parallel_size(mesh)
        self.accum = t.global_batch_size // self.micro
        self.rows = runtime.process_rows(self.micro)
        if prep.train is not None:
            self.seq = seq_len(prep.train, cfg.data.max_len)
            self.steps_per_epoch = math.ceil(len(prep.train) / t.global_batch_size)
            self.max_steps = t.max_steps or math.ceil(t.num_train_epochs * self.steps_per_epoch)
        else:  # run_mode eval: nothing to train, the loop only evaluates
            self.seq, self.steps_per_epoch, self.max_steps = 0, 0, 0

        params, self.model_cfg = hf.place_params(prep.weights, mesh, jnp.dtype(cfg.jax.param_dtype)), prep.weights.cfg
        self.model = qwen2.Qwen2(self.model_cfg, dtype=jnp.dtype(cfg.jax.compute_dtype),
                                 param_dtype=jnp.dtype(cfg.jax.param_dtype), remat=t.gradient_checkpointing)
        self.schedule = optim.warmup_decay(t.learning_rate, t.warmup_steps, self.max_steps, t.lr_schedule)
        self.tx = t.build(self.schedule)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": jax.jit(self.tx.init)(params)}
        # Moments follow their params' shardings; scalars (step, counts) are replicated.
        self.state_shardings = jax.tree.map(
            lambda x: x.sharding if isinstance(x.sharding, NamedSharding) and x.ndim else runtime.replicated(mesh),
            state)
        # Committed to the same shardings the step returns: the second step must not recompile.
        self.state = jax.device_put(state, self.state_shardings)
        if cfg.eval.checkpoint:
            self.state = _restore_latest(cfg.eval.checkpoint, self.state)
        self.search = BeamSearch(self.model, prep.trie, cfg.eval.num_beams, mesh) if prep.trie else None
        self.flops_per_token = qwen2.flops_per_token(self.model_cfg, self.seq)
        self._train_step = jax.jit(self._update, donate_argnums=0, out_shardings=(self.state_shardings, None))
        self._eval_sums = jax.jit(self._nll)

    # --- the math --------------------------------------------------------------------------
    def _nll(self, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Summed cross entropy of the target tokens (response + EOS) and their count."""
        mask, targets = batch["loss_mask"][:, 1:], batch["input_ids"][:, 1:]
        chunk = self.cfg.train.loss_chunk_size
        if chunk:
            hidden, _ = self.model.apply({"params": params}, batch["input_ids"], hidden_only=True)
            total = qwen2.chunked_cross_entropy(params, hidden[:, :-1], targets, mask, self.model_cfg,
                                                self.model.dtype, chunk)
            return total, jnp.sum(mask).astype(jnp.float32)
        logits, _ = self.model.apply({"params": params}, batch["input_ids"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
        return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(mask).astype(jnp.float32)

    def _update(self, state: dict[str, Any],
                batch: dict[str, jax.Array]) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        params = state["params"]
        grad_fn = jax.value_and_grad(self._nll, has_aux=True)

        def micro_step(carry: tuple, micro_batch: dict[str, jax.Array]) -> tuple[tuple, None]:
            loss_sum, count, grads = carry
            (loss, n), g = grad_fn(params, micro_batch)
            return (loss_sum + loss, count + n, jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        zeros = jax.lax.with_sharding_constraint(zeros, self.state_shardings["params"])
        (loss_sum, count, grads), _ = jax.lax.scan(micro_step, (jnp.float32(0), jnp.float32(0), zeros), batch)
        count = jnp.maximum(count, 1.0)
        # Token mean over the whole global batch, not a mean of micro-batch means.
        grads = jax.tree.map(lambda g, p: (g / count).astype(p.dtype), grads, params)
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates), "opt_state": opt_state}
        return new_state, {"loss": loss_sum / count, "grad_norm": optax.global_norm(grads)}

    # --- batches ---------------------------------------------------------------------------
    def _train_batch(self, step: int) -> dict[str, jax.Array]:
        idx = step_indices(len(self.prep.train), self.cfg.train.global_batch_size, self.cfg.seed, step)
        idx = idx.reshape(self.accum, self.micro)[:, self.rows]
        local = self.prep.train.batch(idx.reshape(-1), self.seq, self.prep.eos_id)
        sharding = NamedSharding(self.mesh, P(None, runtime.BATCH_AXES))
        return {k: jax.make_array_from_process_local_data(sharding, v.reshape(self.accum, -1, self.seq),
                                                          (self.accum, self.micro, self.seq))
                for k, v in local.items()}

    # --- the Task protocol -----------------------------------------------------------------
    def train_step(self, state: dict[str, Any], step: int) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        return self._train_step(state, self._train_batch(step))

    def learning_rate(self, step: int) -> float:
        return float(self.schedule(step))

    def tokens(self, step: int) -> int:
        return self.cfg.train.global_batch_size * self.seq

    def evaluate(self, state: dict[str, Any]) -> dict[str, float]:
        """The eval loss over the held-out split (next-item prompts of data.eval_file), and with
        run_mode train_eval/eval the SID evaluation on data.test_file."""
        out = {}
        if self.prep.eval is not None:
            out["eval/loss"] = self._eval_loss(state["params"], self.prep.eval)
        if self.search is not None:
            out.update(self._sid_eval(state["params"], int(jax.device_get(state["step"]))))
        return out

    def _eval_loss(self, params: Any, data: sid.TokenizedExamples) -> float:
        seq = seq_len(data, self.cfg.data.max_len)
        sums = []
        for idx in _batches(len(data), self.micro):
            batch = runtime.to_global(data.batch(idx[self.rows], seq, self.prep.eos_id), self.mesh, self.micro)
            sums.append(self._eval_sums(params, batch))
        loss, count = np.sum(np.asarray(jax.device_get(sums)), axis=0)
        return float(loss / max(count, 1.0))

    def _sid_eval(self, params: Any, step: int) -> dict[str, float]:
        """Constrained beam search over every test prompt: each process feeds its rows of each
        batch, every process gathers all beams, process 0 writes eval_predictions.json and
        eval_metrics.json into the run dir."""
        prompts = self.prep.test_ids
        size = self.cfg.eval.per_device_batch_size * runtime.data_parallel_size(self.mesh)
        rows = runtime.process_rows(size)
        predictions: list[list[str]] = []
        for idx in _batches(len(prompts), size):
            length = _padded_length(max(len(prompts[i]) for i in idx if i >= 0))
            local = [prompts[max(i, 0)] for i in idx[rows]]  # a filler row repeats prompt 0; dropped below
            ids, mask = left_pad(local, length, self.prep.eos_id)
            batch = runtime.to_global({"ids": ids, "mask": mask}, self.mesh, size)
            tokens, _ = self.search(params, batch["ids"], batch["mask"])
            tokens = runtime.to_host(tokens)
            predictions += [[self.prep.trie.decode(b) for b in tokens[r]] for r, i in enumerate(idx) if i >= 0]
        targets = [p.target for p in self.prep.test]
        result = ranking_metrics(predictions, targets, self.cfg.eval.topk, self.prep.trie.valid)
        if jax.process_index() == 0:
            write_eval_files(Path(self.cfg.output_dir), predictions, targets, result, step)
        return {f"eval/{k}": float(v) for k, v in result.items()}

    def finish(self, state: dict[str, Any], console: Console) -> SftSummary:
        t = self.cfg.train
        out: SftSummary = {
            "base_model": self.cfg.base_model,
            "num_params": qwen2.num_params(state["params"]),
            "token_extension": self.prep.token_extension | {"padded_vocab_size": self.model_cfg.padded_vocab_size},
            "run_mode": self.cfg.run_mode,
            "train_examples": len(self.prep.train) if self.prep.train is not None else 0,
            "test_prompts": len(self.prep.test),
            "eval_examples": len(self.prep.eval) if self.prep.eval is not None else 0,
            "seq_len": self.seq,
            "effective_batch": {"global_batch_size": t.global_batch_size,
                                "per_device_train_batch_size": t.per_device_train_batch_size,
                                "data_parallel_devices": runtime.data_parallel_size(self.mesh),
                                "gradient_accumulation_steps": self.accum},
            "steps_per_epoch": self.steps_per_epoch,
            "max_steps": self.max_steps,
        }
        if self.cfg.export_hf and self.max_steps:
            hf_dir = Path(self.cfg.output_dir) / "hf"
            hf.save_pretrained(hf_dir, state["params"], self.model_cfg, self.prep.tokenizer, self.prep.model_dir)
            out["hf_export_dir"] = str(hf_dir.absolute())
            console.print(f"exported the fine-tuned model to {hf_dir}")
        return out


def _batches(n: int, size: int) -> list[np.ndarray]:
    """0..n-1 in rows of `size`, the last row padded with -1 (an empty filler)."""
    order = np.concatenate([np.arange(n), np.full(-n % size, -1)])
    return list(order.reshape(-1, size))


def _restore_latest(directory: str, like: dict[str, Any]) -> dict[str, Any]:
    checkpointer = Checkpointer(directory, every=0, keep=1)
    step = checkpointer.latest_step()
    if step is None:
        raise ConfigError(f"eval.checkpoint: no checkpoint in {directory}")
    state = checkpointer.restore(step, like)
    checkpointer.close()
    return state


def prepare(cfg: Config, mesh: jax.sharding.Mesh) -> Prepared:
    """Read and check the model files and the data; raises ConfigError on bad input."""
    t = cfg.train
    micro = t.per_device_train_batch_size * runtime.data_parallel_size(mesh)
    if t.global_batch_size % micro:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by per_device_train_batch_size "
            f"x data-parallel devices = {t.per_device_train_batch_size} x {runtime.data_parallel_size(mesh)}")
    model_dir = hf.resolve_model_dir(cfg.base_model)
    model_cfg = hf.load_config(model_dir)
    tokenizer = hf.load_tokenizer(model_dir)
    eos_id = hf.eos_token_id(model_dir, tokenizer)
    index = sid.load_index(cfg.data.sid_index_path)
    tokens = sid.sid_tokens(index)
    vocab_before = tokenizer.get_vocab_size(with_added_tokens=True)
    added = hf.add_tokens(tokenizer, tokens)
    extension = {"sid_tokens": len(tokens), "added_tokens": added, "tokenizer_size_before": vocab_before,
                 "embedding_rows_before": model_cfg.vocab_size,
                 "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True)}
    weights = hf.open_weights(model_dir, model_cfg, mesh, vocab_size=extension["vocab_size"])
    train = None
    if cfg.run_mode != "eval":
        train = sid.tokenize(sid.build_examples(cfg.data, cfg.tasks, "train", cfg.seed), tokenizer, eos_id,
                             cfg.data.max_len)
    evals = None
    if cfg.data.eval_file:
        evals = sid.tokenize(sid.build_examples(cfg.data, cfg.tasks, "eval", cfg.seed), tokenizer, eos_id,
                             cfg.data.max_len)
    test, test_ids, trie = [], [], None
    if cfg.run_mode != "train":
        test = sid.build_test_prompts(cfg.data, cfg.seed)
        test_ids = sid.tokenize_prompts(test, tokenizer, cfg.data.max_len)
        trie = build_trie(index, tokenizer, eos_id)
    if cfg.eval.checkpoint and not Path(cfg.eval.checkpoint).is_dir() and "://" not in cfg.eval.checkpoint:
        raise ConfigError(f"eval.checkpoint: directory not found: {cfg.eval.checkpoint}")
    return Prepared(model_dir, model_cfg, weights, tokenizer, eos_id, extension, train, evals, test, test_ids, trie)


def build(cfg: Config, mesh: jax.sharding.Mesh) -> Callable[[], SFTTask]:
    """Check the input before the run starts; the returned function builds the Task."""
    runtime.check_batch(cfg.train.global_batch_size, mesh)
    prep = prepare(cfg, mesh)
    return lambda: SFTTask(cfg, mesh, prep)
