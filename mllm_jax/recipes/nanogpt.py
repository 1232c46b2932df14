"""nanoGPT on character-level text: karpathy/nanoGPT's shakespeare_char, in JAX.

Wires the char data, the GPT model, AdamW with warmup + cosine, held-out eval and text
sampling into the shared train loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mllm_jax import optim, runtime
from mllm_jax.config import ConfigError, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from mllm_jax.optim import OptimizerConfig
from mllm_jax.contracts import NanoGPTSummary
from mllm_jax.data.char import CharDataConfig, CharDataset
from mllm_jax.models.gpt import GPT, GPTConfig, flops_per_token, num_params
from mllm_jax.runtime import JaxConfig
from mllm_jax.tracking import Console, WandbConfig
from mllm_jax.trainer import LoopConfig

if TYPE_CHECKING:
    from mllm_jax.preflight import Plan


@dataclass
class TrainConfig(LoopConfig, OptimizerConfig):
    """nanoGPT's schedule: linear warmup to learning_rate, cosine to min_lr at lr_decay_steps
    (nanoGPT's own values, e.g. learning_rate 1e-3, beta2 0.99, weight_decay 0.1, are in configs/)."""

    max_steps: PositiveInt = 2000
    """Optimizer updates to run in total (a resumed run continues up to this)."""
    global_batch_size: PositiveInt = 12
    """Sequences per update, over all devices and processes."""
    min_lr: NonNegativeFloat = 1e-4
    """The cosine schedule ends here."""
    lr_decay_steps: PositiveInt | None = None
    """Step at which the cosine reaches min_lr; None = max_steps."""
    eval_iters: PositiveInt = 20
    """Batches per evaluation (the same held-out batches every time)."""


@dataclass
class SampleConfig:
    max_new_tokens: NonNegativeInt = 200
    """Characters to generate after training (0 = no sample)."""
    prompt: str = "\n"
    temperature: PositiveFloat = 0.8
    top_k: PositiveInt | None = 200
    """Sample only among the k most likely characters; None = all."""


@dataclass
class Config:
    output_dir: str | None = None
    """Run directory; None = runs/nanogpt-<UTC time>-<short sha>."""
    seed: NonNegativeInt = 1337
    data: CharDataConfig = field(default_factory=CharDataConfig)
    model: GPTConfig = field(default_factory=GPTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    jax: JaxConfig = field(default_factory=JaxConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self) -> None:
        if self.train.selects_best and self.train.best_metric != "eval/loss":
            raise ConfigError(f"train.best_metric {self.train.best_metric}: nanogpt's evaluation reports eval/loss only")


class NanoGPTPrograms:
    """nanoGPT's math without data: the model, optimizer, state init, update and eval loss,
    parameters replicated and the batch split over (dp, fsdp). The Task runs them; preflight
    compiles them for a TPU topology on abstract arguments."""

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh, vocab_size: int):
        self.cfg, self.mesh = cfg, mesh
        self.model = GPT(cfg.model, vocab_size, dtype=jnp.dtype(cfg.jax.compute_dtype),
                         param_dtype=jnp.dtype(cfg.jax.param_dtype))
        t = cfg.train
        self.schedule = optim.warmup_cosine(t.learning_rate, t.min_lr, t.warmup_steps, t.lr_decay_steps or t.max_steps)
        self.tx = t.build(self.schedule)
        self.replicated = runtime.replicated(mesh)
        self.init_key, self.dropout_key = jax.random.split(jax.random.key(cfg.seed))
        self.init = jax.jit(self._init, out_shardings=self.replicated)
        self.abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated),
                                           jax.eval_shape(self._init, self.init_key))
        self.train_step = jax.jit(self._update, donate_argnums=0, out_shardings=self.replicated)
        self.eval_loss = jax.jit(self._loss, static_argnames="train", out_shardings=self.replicated)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        shape = (self.cfg.train.global_batch_size, self.cfg.model.block_size)
        sharding = runtime.batch_sharding(self.mesh)
        return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in ("x", "y")}

    def _init(self, key: jax.Array) -> dict[str, Any]:
        dummy = jnp.zeros((1, self.cfg.model.block_size), jnp.int32)
        params = self.model.init(key, dummy)["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}

    def _loss(self, params: Any, batch: dict[str, jax.Array], train: bool = False,
              dropout_key: jax.Array | None = None) -> jax.Array:
        rngs = {"dropout": dropout_key} if train else {}
        logits = self.model.apply({"params": params}, batch["x"], train=train, rngs=rngs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    def _update(self, state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        key = jax.random.fold_in(self.dropout_key, state["step"])
        loss, grads = jax.value_and_grad(self._loss)(state["params"], batch, True, key)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                     "opt_state": opt_state}
        return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}


class NanoGPTTask:
    """The trainer's Task for nanoGPT: parameters replicated, batch split over (dp, fsdp).
    `data` is the corpus `build` read and checked (read here when not given)."""

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh, data: CharDataset | None = None):
        self.cfg, self.mesh = cfg, mesh
        self.data = data or CharDataset(cfg.data.path, cfg.model.block_size)
        self.programs = NanoGPTPrograms(cfg, mesh, self.data.vocab_size)
        self.model, self.schedule = self.programs.model, self.programs.schedule
        t = cfg.train
        self.rows = runtime.process_rows(t.global_batch_size)
        self.max_steps = t.max_steps
        self.tokens_per_step = t.global_batch_size * cfg.model.block_size
        self.state = self.programs.init(self.programs.init_key)
        self.flops_per_token = flops_per_token(cfg.model, num_params(self.state["params"]))
        self._eval_loss = self.programs.eval_loss
        self._train_step = runtime.CompiledStep(self.programs.train_step)
        # The same held-out batches at every evaluation: comparable numbers, no training RNG used.
        self.eval_batches = [self._batch("val", i) for i in range(t.eval_iters)]

    def _batch(self, split: str, index: int) -> dict[str, jax.Array]:
        b = self.cfg.train.global_batch_size
        return runtime.to_global(self.data.batch(split, self.cfg.seed, index, b, self.rows), self.mesh, b)

    def train_step(self, state: dict[str, Any], step: int) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        return self._train_step(state, self._batch("train", step))

    @property
    def step_memory(self) -> dict[str, int] | None:
        return self._train_step.memory

    def learning_rate(self, step: int) -> float:
        return float(self.schedule(step))

    def tokens(self, step: int) -> int:
        return self.tokens_per_step

    def evaluate(self, state: dict[str, Any]) -> dict[str, float]:
        losses = [self._eval_loss(state["params"], batch) for batch in self.eval_batches]
        return {"eval/loss": float(np.mean(jax.device_get(losses)))}

    def finish(self, state: dict[str, Any], console: Console) -> NanoGPTSummary:
        out: NanoGPTSummary = {"num_params": num_params(state["params"]), "vocab_size": self.data.vocab_size}
        s = self.cfg.sample
        if s.max_new_tokens:
            prompt = self.data.encode(s.prompt) or [0]
            ids = generate(self.model, state["params"], prompt, s.max_new_tokens, s.temperature, s.top_k,
                           self.cfg.seed + 1, runtime.replicated(self.mesh))
            out["sample"] = self.data.decode(ids)
            console.print("sample:\n" + s.prompt + out["sample"])
        return out


def generate(model: GPT, params: Any, prompt: list[int], max_new_tokens: int, temperature: float,
             top_k: int | None, seed: int, sharding: jax.sharding.Sharding) -> list[int]:
    """Sample `max_new_tokens` continuations of `prompt`, cropping the context to block_size as
    nanoGPT does. Causal attention lets one fixed-size window serve every length: the logits
    are read at the last real position, and padding after it cannot leak backwards."""
    block = model.cfg.block_size
    total = len(prompt) + max_new_tokens
    buf = np.zeros(max(total, block), np.int32)
    buf[: len(prompt)] = prompt

    @jax.jit
    def run(params: Any, buf: jax.Array, key: jax.Array) -> jax.Array:
        def body(n: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            buf, key = carry
            start = jnp.maximum(n - block, 0)
            window = jax.lax.dynamic_slice(buf, (start,), (block,))
            logits = model.apply({"params": params}, window[None])[0, n - 1 - start] / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = jax.lax.top_k(logits, top_k)[0][-1]
                logits = jnp.where(logits < kth, -jnp.inf, logits)
            key, sub = jax.random.split(key)
            return buf.at[n].set(jax.random.categorical(sub, logits).astype(jnp.int32)), key

        return jax.lax.fori_loop(len(prompt), total, body, (buf, jax.random.wrap_key_data(key)))[0]

    # Every process runs the same sampling (the params span all of them); inputs are replicated.
    out = run(params, jax.device_put(buf, sharding), jax.device_put(jax.random.key_data(jax.random.key(seed)), sharding))
    return [int(i) for i in jax.device_get(out)[len(prompt): total]]


def preflight(cfg: Config, mesh: jax.sharding.Mesh) -> "Plan":
    """nanoGPT's update and eval loss on abstract arguments; the vocabulary is the corpus's
    characters (data.path, or Tiny Shakespeare from the cache)."""
    from mllm_jax.preflight import Plan, Program

    runtime.check_batch(cfg.train.global_batch_size, mesh)
    vocab = CharDataset(cfg.data.path, cfg.model.block_size).vocab_size
    programs = NanoGPTPrograms(cfg, mesh, vocab)
    state, batch = programs.abstract_state, programs.abstract_batch()
    tokens = cfg.train.global_batch_size * cfg.model.block_size
    m = cfg.model
    return Plan([Program("train_step", programs.train_step, (state, batch),
                         model_flops=flops_per_token(m, num_params(state["params"])) * tokens,
                         note=f"{cfg.train.global_batch_size} x {m.block_size} tokens"),
                 Program("eval_loss", programs.eval_loss, (state["params"], batch))],
                facts={"layers": m.n_layer, "n_embd": m.n_embd, "block_size": m.block_size,
                       "vocab": vocab,
                       "global_batch": cfg.train.global_batch_size,
                       "dtypes": f"params {cfg.jax.param_dtype}, compute {cfg.jax.compute_dtype}"},
                knobs=[f"train.global_batch_size (now {cfg.train.global_batch_size})",
                       f"model.block_size (now {m.block_size})"])


def build(cfg: Config, mesh: jax.sharding.Mesh) -> Callable[[], NanoGPTTask]:
    """Check what can be checked before the run starts (the batch, and the data: read here, so
    a bad file is refused before the run dir exists); the returned function builds the Task."""
    runtime.check_batch(cfg.train.global_batch_size, mesh)
    data = CharDataset(cfg.data.path, cfg.model.block_size)
    return lambda: NanoGPTTask(cfg, mesh, data)
