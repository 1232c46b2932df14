"""The GPT of karpathy/nanoGPT in Flax: learned positions, pre-LayerNorm blocks, GELU MLP,
optional biases, dropout, and an LM head tied to the token embedding."""

from __future__ import annotations

import math
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax.config import ConfigError, PositiveInt


@dataclass
class GPTConfig:
    n_layer: PositiveInt = 4
    n_head: PositiveInt = 4
    n_embd: PositiveInt = 128
    block_size: PositiveInt = 64
    """Context length in tokens."""
    dropout: float = 0.0
    bias: bool = False
    """Biases in Linear and LayerNorm layers (GPT-2 has them; a little better and faster without)."""

    def validate(self) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: expected a float in [0, 1), got {self.dropout}")


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x[..., i] @ w[i, o], with a hand-written backward pass.

    Plain autodiff makes XLA:CPU transpose the large activation gradient before the weight
    gradient matmul, which cost about half of the CPU step time (benchmarks/nanogpt_cpu.py).
    Here the weight gradient is one einsum over (batch, time) that transposes only the
    smaller result. The values are the same; other backends are unaffected."""
    return jnp.einsum("...i,io->...o", x, w)


def _matmul_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return matmul(x, w), (x, w)


def _matmul_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    dx = jnp.einsum("...o,io->...i", g, w)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    if x.shape[-1] > g.shape[-1]:
        dw = jnp.einsum("no,ni->oi", g2, x2).T
    else:
        dw = jnp.einsum("ni,no->io", x2, g2)
    return dx, dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Linear(nn.Module):
    """nn.Dense with the matmul above (same parameter names: kernel, bias)."""

    features: int
    use_bias: bool
    std: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.normal(self.std), (x.shape[-1], self.features), self.param_dtype)
        y = matmul(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        return y


class _Sublayer(nn.Module):
    """Fields every part of a GPT block carries."""

    cfg: GPTConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype


class CausalSelfAttention(_Sublayer):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cfg = self.cfg
        B, T, C = x.shape
        head_dim = C // cfg.n_head
        dense = lambda n, std, name: Linear(n, cfg.bias, std, self.dtype, self.param_dtype, name=name)  # noqa: E731
        qkv = dense(3 * C, 0.02, "c_attn")(x).reshape(B, T, 3, cfg.n_head, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        causal = jnp.tril(jnp.ones((T, T), dtype=bool))
        att = jax.nn.softmax(jnp.where(causal, att, -jnp.inf).astype(jnp.float32), axis=-1).astype(self.dtype)
        att = nn.Dropout(cfg.dropout)(att, deterministic=not train)
        y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, T, C)
        # Residual projections are scaled down with depth, as in GPT-2.
        y = dense(C, 0.02 / math.sqrt(2 * cfg.n_layer), "c_proj")(y)
        return nn.Dropout(cfg.dropout)(y, deterministic=not train)


class MLP(_Sublayer):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cfg = self.cfg
        x = Linear(4 * cfg.n_embd, cfg.bias, 0.02, self.dtype, self.param_dtype, name="c_fc")(x)
        x = nn.gelu(x, approximate=False)  # torch.nn.GELU's exact erf form, as in nanoGPT
        x = Linear(cfg.n_embd, cfg.bias, 0.02 / math.sqrt(2 * cfg.n_layer), self.dtype, self.param_dtype,
                   name="c_proj")(x)
        return nn.Dropout(cfg.dropout)(x, deterministic=not train)


class Block(_Sublayer):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, use_bias=self.cfg.bias, dtype=self.dtype,  # noqa: E731
                                       param_dtype=self.param_dtype, name=name)
        x = x + CausalSelfAttention(self.cfg, self.dtype, self.param_dtype, name="attn")(ln("ln_1")(x), train)
        x = x + MLP(self.cfg, self.dtype, self.param_dtype, name="mlp")(ln("ln_2")(x), train)
        return x


class GPT(nn.Module):
    cfg: GPTConfig
    vocab_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, idx: jax.Array, train: bool = False) -> jax.Array:
        """Token ids (B, T) -> next-token logits (B, T, vocab), always float32."""
        cfg = self.cfg
        wte = nn.Embed(self.vocab_size, cfg.n_embd, dtype=self.dtype, param_dtype=self.param_dtype,
                       embedding_init=nn.initializers.normal(0.02), name="wte")
        wpe = nn.Embed(cfg.block_size, cfg.n_embd, dtype=self.dtype, param_dtype=self.param_dtype,
                       embedding_init=nn.initializers.normal(0.02), name="wpe")
        x = wte(idx) + wpe(jnp.arange(idx.shape[1]))
        x = nn.Dropout(cfg.dropout)(x, deterministic=not train)
        for i in range(cfg.n_layer):
            x = Block(cfg, self.dtype, self.param_dtype, name=f"h_{i}")(x, train)
        x = nn.LayerNorm(epsilon=1e-5, use_bias=cfg.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="ln_f")(x)
        return wte.attend(x).astype(jnp.float32)  # weight tying: the head is wte transposed


def num_params(params: dict, non_embedding: bool = True) -> int:
    """Parameter count; without position embeddings by default, as nanoGPT reports it."""
    n = sum(p.size for p in jax.tree.leaves(params))
    return n - params["wpe"]["embedding"].size if non_embedding else n


def flops_per_token(cfg: GPTConfig, n_params: int) -> float:
    """Training FLOPs per token (PaLM appendix B, as nanoGPT's estimate_mfu)."""
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
