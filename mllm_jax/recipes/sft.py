"""Semantic-ID SFT (MiniOneRec): fine-tune a Qwen2-family model from Hugging Face weights on
next-item, item-alignment and fusion tasks written with SID tokens.

Wires the HF import (weights, tokenizer, SID tokens added), the SID data, and a jitted step
that accumulates gradients over the whole global batch into the shared train loop; evaluates
with the eval loss and (run_mode train_eval / eval) the constrained beam search over the SID
trie, HR@K / NDCG@K as MiniOneRec computes them; exports the fine-tuned model to HF files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

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
from mllm_jax.eval.beam_search import BeamSearch
from mllm_jax.eval.sid_eval import SidEvalConfig, evaluate_sids, index_batches, padded_length
from mllm_jax.eval.sid_trie import SidTrie, build_trie
from mllm_jax.models import hf, qwen2
from mllm_jax.runtime import JaxConfig
from mllm_jax.tracking import Console, WandbConfig
from mllm_jax.trainer import LoopConfig

if TYPE_CHECKING:
    from mllm_jax.preflight import Plan

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
    lr_schedule: Literal["cosine", "linear", "constant"] = "linear"
    """After warmup (linear from 0): decay to 0 at the last step, or stay constant. Linear is what
    MiniOneRec's sft.py trains with: the Hugging Face Trainer's default (its cosine scheduler is
    defined but never passed to the Trainer)."""
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
    scan_layers: bool = True
    """Run the decoder layers as one lax.scan: XLA compiles one layer body instead of one per
    layer (Qwen2.5-1.5B for a v6e-8: minutes -> under one); same values. Parameters, checkpoints
    and the HF export keep one entry per layer."""
    attention: Literal["xla", "cudnn", "splash"] = "xla"
    """Attention in training and the eval loss: xla (any backend), cudnn (fused, NVIDIA GPUs),
    splash (the Pallas kernel, TPUs). The beam search always uses xla."""
    load_best_model_at_end: bool = True
    """Finish (export hf/) with the parameters of the best evaluation of train.best_metric (the
    eval loss by default), as MiniOneRec's sft.py (load_best_model_at_end=True)."""
    early_stopping_patience: NonNegativeInt = 3
    """Stop after this many evaluations without a new best (MiniOneRec's EarlyStoppingCallback(3));
    0 = never."""


@dataclass
class EvalConfig(SidEvalConfig):
    """The SID evaluation: constrained beam search over the index's SIDs on data.test_file."""

    checkpoint: str | None = None
    """With run_mode eval: an orbax checkpoint directory (a run's checkpoints/) whose latest step
    is evaluated; None = the base_model weights."""


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
        t = self.train
        if t.selects_best and self.run_mode != "eval":
            if t.best_metric == "eval/loss" and not self.data.eval_file:
                raise ConfigError("train.best_metric eval/loss needs data.eval_file (or set train.load_best_model_at_end="
                                  "false and train.early_stopping_patience=0)")
            if t.best_metric != "eval/loss" and self.run_mode != "train_eval":
                raise ConfigError(f"train.best_metric {t.best_metric}: the SID evaluation runs only with run_mode "
                                  "train_eval")
            if t.best_metric != "eval/loss":
                self.eval.check_selects(t.best_metric)


@dataclass
class Prepared:
    """Everything read from disk before the run starts (bad input fails here)."""

    model_dir: Path
    weights: hf.Weights
    """Opened and checked against config.json, the vocabulary grown by the SID tokens (memory-mapped:
    loaded when the Task is built)."""
    tokenizer: Any
    eos_id: int
    token_extension: dict[str, int]
    train: sid.TokenizedExamples | None
    """None with run_mode eval."""
    eval: sid.TokenizedExamples | None
    test: list[sid.TestPrompt]
    test_ids: list[np.ndarray]
    trie: SidTrie | None


def seq_len(examples: sid.TokenizedExamples, max_len: int) -> int:
    return min(max_len, padded_length(examples.max_length(), SEQ_MULTIPLE))


class SftPrograms:
    """sft's math, built from the model config alone (no weights): the update over one global
    batch and the eval-loss sums, with the state's shardings. The Task runs them on real arrays;
    preflight compiles them on abstract ones for a TPU topology."""

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh, model_cfg: qwen2.Qwen2Config, max_steps: int):
        t = cfg.train
        self.cfg, self.mesh, self.model_cfg = cfg, mesh, model_cfg
        self.micro = t.per_device_train_batch_size * runtime.data_parallel_size(mesh)
        self.accum = t.global_batch_size // self.micro
        param_dtype = jnp.dtype(cfg.jax.param_dtype)
        self.model = qwen2.Qwen2(model_cfg, dtype=jnp.dtype(cfg.jax.compute_dtype), param_dtype=param_dtype,
                                 remat=t.gradient_checkpointing, scan_layers=t.scan_layers, attention=t.attention,
                                 mesh=mesh)
        self.schedule = optim.warmup_decay(t.learning_rate, t.warmup_steps, max(max_steps, 1), t.lr_schedule)
        self.tx = t.build(self.schedule)
        shapes = hf.abstract_params(model_cfg, param_dtype)
        params = jax.tree.map(lambda spec: NamedSharding(mesh, spec), qwen2.param_specs(shapes, mesh))
        replicated = runtime.replicated(mesh)
        # Moments follow their params' shardings; scalars (step, counts) are replicated.
        opt_state = optax.tree_map_params(self.tx, lambda _, sharding: sharding, jax.eval_shape(self.tx.init, shapes),
                                          params, transform_non_params=lambda _: replicated,
                                          is_leaf=lambda x: isinstance(x, NamedSharding))
        self.state_shardings = {"step": replicated, "params": params, "opt_state": opt_state}
        self.abstract_state = jax.tree.map(
            lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
            {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": shapes,
             "opt_state": jax.eval_shape(self.tx.init, shapes)}, self.state_shardings)
        self.train_step = jax.jit(self._update, donate_argnums=0, out_shardings=(self.state_shardings, None))
        self.eval_sums = jax.jit(self._nll)

    def abstract_batch(self, seq: int, micro_batches: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        """The shapes of a training batch (micro_batches x micro x seq), or of one eval batch
        (micro x seq) with micro_batches None."""
        if micro_batches is None:
            shape, spec = (self.micro, seq), P(runtime.BATCH_AXES)
        else:
            shape, spec = (micro_batches, self.micro, seq), P(None, runtime.BATCH_AXES)
        sharding = NamedSharding(self.mesh, spec)
        return {"input_ids": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding),
                "loss_mask": jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=sharding)}

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


class SFTTask:
    """The trainer's Task for SID SFT: params sharded by qwen2.param_specs, batches of shape
    (accumulation, micro-batch, seq) split over (dp, fsdp) on the micro-batch axis."""

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh, prep: Prepared):
        self.cfg, self.mesh, self.prep, t = cfg, mesh, prep, cfg.train
        if prep.train is not None:
            self.seq = seq_len(prep.train, cfg.data.max_len)
            self.steps_per_epoch = math.ceil(len(prep.train) / t.global_batch_size)
            self.max_steps = t.max_steps or math.ceil(t.num_train_epochs * self.steps_per_epoch)
        else:  # run_mode eval: nothing to train, the loop only evaluates
            self.seq, self.steps_per_epoch, self.max_steps = 0, 0, 0
        self.model_cfg = prep.weights.cfg
        self.programs = SftPrograms(cfg, mesh, self.model_cfg, self.max_steps)
        self.micro, self.accum, self.model = self.programs.micro, self.programs.accum, self.programs.model
        self.rows = runtime.process_rows(self.micro)
        self.schedule, self.state_shardings = self.programs.schedule, self.programs.state_shardings
        params = hf.place_params(prep.weights, mesh, jnp.dtype(cfg.jax.param_dtype))
        opt_state = jax.jit(self.programs.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
        # Committed to the same shardings the step returns: the second step must not recompile.
        self.state = jax.device_put({"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state},
                                    self.state_shardings)
        if cfg.eval.checkpoint:
            self.state = _restore_latest(cfg.eval.checkpoint, self.state)
        self.search = BeamSearch(self.model, prep.trie, cfg.eval.num_beams, mesh) if prep.trie else None
        self.flops_per_token = qwen2.flops_per_token(self.model_cfg, self.seq)
        self._eval_sums = self.programs.eval_sums
        self._train_step = runtime.CompiledStep(self.programs.train_step)

    # --- batches ---------------------------------------------------------------------------
    def _train_batch(self, step: int) -> dict[str, jax.Array]:
        idx = runtime.step_indices(len(self.prep.train), self.cfg.train.global_batch_size, self.cfg.seed, step)
        idx = idx.reshape(self.accum, self.micro)[:, self.rows]
        local = self.prep.train.batch(idx.reshape(-1), self.seq, self.prep.eos_id)
        sharding = NamedSharding(self.mesh, P(None, runtime.BATCH_AXES))
        return {k: jax.make_array_from_process_local_data(sharding, v.reshape(self.accum, -1, self.seq),
                                                          (self.accum, self.micro, self.seq))
                for k, v in local.items()}

    # --- the Task protocol -----------------------------------------------------------------
    def train_step(self, state: dict[str, Any], step: int) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        return self._train_step(state, self._train_batch(step))

    @property
    def step_memory(self) -> dict[str, int] | None:
        return self._train_step.memory

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
        for idx in index_batches(len(data), self.micro):
            batch = runtime.to_global(data.batch(idx[self.rows], seq, self.prep.eos_id), self.mesh, self.micro)
            sums.append(self._eval_sums(params, batch))
        loss, count = np.sum(np.asarray(jax.device_get(sums)), axis=0)
        return float(loss / max(count, 1.0))

    def _sid_eval(self, params: Any, step: int) -> dict[str, float]:
        return evaluate_sids(self.search, params, self.prep.test_ids, [p.target for p in self.prep.test],
                             self.cfg.eval, self.mesh, self.prep.eos_id, Path(self.cfg.output_dir), step)

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


def _restore_latest(directory: str, like: dict[str, Any]) -> dict[str, Any]:
    checkpointer = Checkpointer(directory, every=0, keep=1)
    step = checkpointer.latest_step()
    if step is None:
        raise ConfigError(f"eval.checkpoint: no checkpoint in {directory}")
    state = checkpointer.restore(step, like)
    checkpointer.close()
    return state


def _check_batch(cfg: Config, mesh: jax.sharding.Mesh) -> None:
    t = cfg.train
    runtime.check_batch(t.global_batch_size, mesh)
    micro = t.per_device_train_batch_size * runtime.data_parallel_size(mesh)
    if t.global_batch_size % micro:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by per_device_train_batch_size "
            f"x data-parallel devices = {t.per_device_train_batch_size} x {runtime.data_parallel_size(mesh)}")


def prepare(cfg: Config, mesh: jax.sharding.Mesh) -> Prepared:
    """Read and check the model files and the data; raises ConfigError on bad input."""
    _check_batch(cfg, mesh)
    backend = {"splash": "tpu", "cudnn": "gpu"}.get(cfg.train.attention)
    if backend and jax.default_backend() != backend:
        raise ConfigError(f"train.attention: {cfg.train.attention} needs a {backend.upper()} backend, this run's is "
                          f"{jax.default_backend()}; use xla here")
    index = sid.load_index(cfg.data.sid_index_path)
    if (note := sid.collisions(index)) and jax.process_index() == 0:
        print(note, flush=True)
    opened = hf.open_with_tokens(cfg.base_model, sid.sid_tokens(index), mesh)
    tokenizer, eos_id = opened.tokenizer, opened.eos_id
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
        test = sid.build_test_prompts(cfg.data.test_file, cfg.data.sid_index_path, cfg.data.sample_test, cfg.seed)
        test_ids = sid.tokenize_prompts(test, tokenizer, cfg.data.max_len)
        trie = build_trie(index, tokenizer, eos_id)
    if cfg.eval.checkpoint and not Path(cfg.eval.checkpoint).is_dir() and "://" not in cfg.eval.checkpoint:
        raise ConfigError(f"eval.checkpoint: directory not found: {cfg.eval.checkpoint}")
    return Prepared(opened.model_dir, opened.weights, tokenizer, eos_id, opened.token_extension, train, evals, test,
                    test_ids, trie)


def build(cfg: Config, mesh: jax.sharding.Mesh) -> Callable[[], SFTTask]:
    """Check the input before the run starts; the returned function builds the Task."""
    prep = prepare(cfg, mesh)
    return lambda: SFTTask(cfg, mesh, prep)


def preflight(cfg: Config, mesh: jax.sharding.Mesh) -> "Plan":
    """sft's programs on abstract arguments, from config.json and the tokenizer alone: the
    update over one global batch, the eval loss of one micro-batch and, for run_mode train_eval
    or eval when data.sid_index_path is on this machine, the beam search of one eval batch.
    Sequences are data.max_len tokens (the longest a batch can be). With the SID index here the
    vocabulary is the tokenizer's plus its SID tokens, else config.json's vocab_size."""
    from mllm_jax.preflight import Plan, Program

    _check_batch(cfg, mesh)
    t = cfg.train
    index_path = cfg.data.sid_index_path
    index = sid.load_index(index_path) if index_path and Path(index_path).is_file() else None
    model_dir, model_cfg, tokenizer = hf.config_with_tokens(cfg.base_model, index and sid.sid_tokens(index), mesh)
    vocab_from = "tokenizer + SID tokens" if index is not None else "config.json; SID index not on this machine"
    seq = cfg.data.max_len
    programs = SftPrograms(cfg, mesh, model_cfg, t.max_steps or 1)
    state, micro = programs.abstract_state, programs.micro
    tokens = t.global_batch_size * seq
    plan = Plan([
        Program("train_step", programs.train_step, (state, programs.abstract_batch(seq, programs.accum)),
                model_flops=qwen2.flops_per_token(model_cfg, seq) * tokens, pieces=_step_pieces(programs, seq),
                note=f"{programs.accum} micro-batches of {micro} x {seq} tokens; estimate summed over its loop "
                     "bodies (layers, LM head + loss, optimizer)"),
        Program("eval_loss", programs.eval_sums, (state["params"], programs.abstract_batch(seq)),
                note=f"one eval batch of {micro} x {seq}"),
    ], facts={"layers": model_cfg.num_hidden_layers, "hidden": model_cfg.hidden_size,
              "vocab": f"{model_cfg.padded_vocab_size} padded ({vocab_from})", "seq": f"{seq} (data.max_len)",
              "micro_batch": micro, "accumulation": programs.accum,
              "dtypes": f"params {cfg.jax.param_dtype}, compute {cfg.jax.compute_dtype}"})
    if cfg.run_mode != "train" and index is not None:
        search = BeamSearch(programs.model, build_trie(index, tokenizer, hf.eos_token_id(model_dir, tokenizer)),
                            cfg.eval.num_beams, mesh)
        prompts = cfg.eval.per_device_batch_size * runtime.data_parallel_size(mesh)
        plan.programs.append(Program("beam_search", search.jitted, search.abstract_args(state["params"], prompts, seq),
                                     note=f"{prompts} prompts of {seq} tokens x {cfg.eval.num_beams} beams"))
    plan.knobs = [f"train.per_device_train_batch_size (now {t.per_device_train_batch_size}; the accumulation "
                  "keeps train.global_batch_size)"]
    if not t.loss_chunk_size:
        plan.knobs.append("train.loss_chunk_size=128")
    if not t.gradient_checkpointing:
        plan.knobs.append("train.gradient_checkpointing=true")
    if mesh.shape["fsdp"] == 1:
        plan.knobs.append("jax.mesh_shape=1,-1,1 (fsdp shards weights and optimizer state)")
    if cfg.run_mode != "train":
        plan.knobs.append(f"eval.per_device_batch_size (now {cfg.eval.per_device_batch_size}) for the beam search")
    return plan


def _step_pieces(p: SftPrograms, seq: int) -> list[tuple[int, Any, tuple]]:
    """The update's loop bodies, for XLA's estimate of the whole (which counts a loop body once):
    per micro-batch each decoder layer forward + backward (+ its recomputation with remat) and
    the LM head + loss per chunk (+ recomputation when chunked); then the optimizer once. The
    embedding lookup and the norms are left out (a few element-wise ops)."""
    cfg, model, t = p.model_cfg, p.model, p.cfg.train
    params = p.abstract_state["params"]
    batch = NamedSharding(p.mesh, P(runtime.BATCH_AXES))
    layer = qwen2.DecoderLayer(cfg, model.dtype, model.param_dtype, model.attention, p.mesh)

    def forward(layer_params: Any, h: jax.Array) -> jax.Array:
        positions = jnp.broadcast_to(jnp.arange(h.shape[1]), h.shape[:2])
        cos, sin = qwen2.rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        return layer.apply({"params": layer_params}, h, cos, sin, None)[0]

    def forward_backward(layer_params: Any, h: jax.Array) -> Any:
        y, vjp = jax.vjp(forward, layer_params, h)
        return vjp(y)

    chunk = t.loss_chunk_size or seq
    head = {k: params[k] for k in ("embed_tokens", "lm_head") if k in params}

    def loss(head_params: Any, h: jax.Array, y: jax.Array) -> jax.Array:
        logits = qwen2.head_logits(head_params, h, cfg, model.dtype)
        return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0])

    def optimizer(state: dict[str, Any], grads: Any) -> Any:
        updates, opt_state = p.tx.update(grads, state["opt_state"], state["params"])
        return optax.apply_updates(state["params"], updates), opt_state

    x = jax.ShapeDtypeStruct((p.micro, seq, cfg.hidden_size), model.dtype, sharding=batch)
    h = jax.ShapeDtypeStruct((p.micro, chunk, cfg.hidden_size), model.dtype, sharding=batch)
    y = jax.ShapeDtypeStruct((p.micro, chunk), jnp.int32, sharding=batch)
    layers, chunks = cfg.num_hidden_layers * p.accum, -(-seq // chunk) * p.accum
    pieces = [(layers, jax.jit(forward_backward), (params["layers_0"], x)),
              (chunks, jax.jit(jax.grad(loss, argnums=(0, 1))), (head, h, y)),
              (1, jax.jit(optimizer), (p.abstract_state, params))]
    if t.gradient_checkpointing:
        pieces.append((layers, jax.jit(forward), (params["layers_0"], x)))
    if t.loss_chunk_size:
        pieces.append((chunks, jax.jit(loss), (head, h, y)))
    return pieces
