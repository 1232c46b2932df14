"""The Qwen2 decoder (and Llama, which differs only by config) in Flax: RMSNorm, rotary
positions, grouped-query attention, SwiGLU MLP, and a KV cache for generation.

Parameter names follow Hugging Face's (models/hf.py maps them 1:1): embed_tokens/embedding,
layers_{i}/self_attn/{q,k,v,o}_proj/{kernel,bias}, layers_{i}/mlp/{gate,up,down}_proj/kernel,
layers_{i}/{input,post_attention}_layernorm/scale, norm/scale, lm_head/kernel (untied only).
Kernels are (in, out), the transpose of torch's Linear weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from mllm_jax.config import ConfigError
from mllm_jax.models.gpt import Linear, matmul
from mllm_jax.runtime import BATCH_AXES

# Added to masked logits/attention scores: effectively -inf, but finite, so softmax, its
# gradient and temperature scaling never produce NaN.
MASK_VALUE = -1e30


@dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    """None: hidden_size // num_attention_heads."""
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = False
    attention_bias: bool = True
    """Biases on q/k/v projections: Qwen2 has them, Llama does not."""
    max_position_embeddings: int = 32768
    padded_vocab_size: int | None = None
    """Rows of the embedding / columns of the head, >= vocab_size (None: vocab_size). The
    padding lets the vocab dimension split evenly over devices; its logits are masked."""

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.padded_vocab_size is None:
            object.__setattr__(self, "padded_vocab_size", self.vocab_size)
        if self.padded_vocab_size < self.vocab_size:
            raise ConfigError(f"padded_vocab_size={self.padded_vocab_size} is smaller than "
                              f"vocab_size={self.vocab_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        # As Hugging Face: normalise in float32, cast back, then scale.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables (B, T, head_dim) for the given positions, in float32."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, T, heads, head_dim) rotated Hugging Face's way ("rotate_half": halves, not pairs)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


ATTENTION_IMPLS = ("xla", "cudnn", "splash")
"""How causal self-attention without a cache is computed (training and the eval loss): "xla"
(plain einsums, every backend), "cudnn" (jax.nn.dot_product_attention's fused cuDNN kernel,
NVIDIA GPUs), "splash" (the Pallas splash-attention kernel, TPUs). Decoding always uses "xla"."""


class _Sublayer(nn.Module):
    cfg: Qwen2Config
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention: str = "xla"
    """One of ATTENTION_IMPLS."""
    mesh: Mesh | None = None
    """The mesh the activations are sharded over: "splash" runs per shard (shard_map)."""

    def dense(self, features: int, bias: bool, name: str) -> Linear:
        return Linear(features, bias, 0.02, self.dtype, self.param_dtype, name=name)


class Attention(_Sublayer):
    @nn.compact
    def __call__(self, x, cos, sin, mask, kv_cache=None, index=None, prefix=None):
        """mask (B, T, S) marks the keys each query may see (None: causal over x alone, where a
        fused `attention` implementation may run). With kv_cache=(k, v), each
        (B, S_max, KVH, hd), the new keys/values are written at [index, index+T) and
        attention runs over the whole cache; returns (y, (k, v) updated or None).

        prefix=(k, v, mask): keys/values (Bp, Lp, KVH, hd) and valid keys (Bp, Lp) that precede
        every query of the Bp contiguous groups of B // Bp rows; each row also attends to its
        group's valid prefix keys, read once per group (one softmax over both key sets)."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, KVH, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = self.dense(H * hd, cfg.attention_bias, "q_proj")(x).reshape(B, T, H, hd)
        k = self.dense(KVH * hd, cfg.attention_bias, "k_proj")(x).reshape(B, T, KVH, hd)
        v = self.dense(KVH * hd, cfg.attention_bias, "v_proj")(x).reshape(B, T, KVH, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.attention != "xla" and kv_cache is None and prefix is None and mask is None:
            y = fused_attention(q, k, v, self.attention, self.mesh)
            return self.dense(cfg.hidden_size, False, "o_proj")(y.reshape(B, T, H * hd)), None
        if mask is None:
            mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
        new_cache = None
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            new_cache = (k, v)
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        # Grouped-query attention: query heads in KVH groups of G share one key/value head.
        q = q.reshape(B, T, KVH, H // KVH, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * hd**-0.5
        scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
        if prefix is not None:
            pk, pv, pmask = prefix
            Bp, Lp = pmask.shape
            qp = q.reshape(Bp, B // Bp, T, KVH, H // KVH, hd)
            sp = jnp.einsum("prtkgd,plkd->prkgtl", qp, pk.astype(self.dtype),
                            preferred_element_type=jnp.float32) * hd**-0.5
            sp = jnp.where(pmask[:, None, None, None, None], sp, MASK_VALUE).reshape(B, KVH, H // KVH, T, Lp)
            scores = jnp.concatenate([sp, scores], axis=-1)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        # Values first in the PV einsums: XLA then emits (queries x keys) @ (keys x hd), vectorised
        # over hd; the other operand order is up to 2-3x slower on CPU at decode shapes.
        if prefix is not None:
            pp = probs[..., :Lp].reshape(Bp, B // Bp, KVH, H // KVH, T, Lp)
            probs = probs[..., Lp:]
            y = (jnp.einsum("plkd,prkgtl->prtkgd", pv.astype(self.dtype), pp).reshape(q.shape)
                 + jnp.einsum("bskd,bkgts->btkgd", v, probs))
        else:
            y = jnp.einsum("bskd,bkgts->btkgd", v, probs)
        return self.dense(cfg.hidden_size, False, "o_proj")(y.reshape(B, T, H * hd)), new_cache


class MLP(_Sublayer):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        F = self.cfg.intermediate_size
        h = nn.silu(self.dense(F, False, "gate_proj")(x)) * self.dense(F, False, "up_proj")(x)
        return self.dense(self.cfg.hidden_size, False, "down_proj")(h)


class DecoderLayer(_Sublayer):
    @nn.compact
    def __call__(self, x, cos, sin, mask, kv_cache=None, index=None, prefix=None):
        norm = lambda name: RMSNorm(self.cfg.rms_norm_eps, self.dtype, self.param_dtype, name=name)  # noqa: E731
        y, new_cache = Attention(self.cfg, self.dtype, self.param_dtype, self.attention, self.mesh, name="self_attn")(
            norm("input_layernorm")(x), cos, sin, mask, kv_cache, index, prefix)
        x = x + y
        x = x + MLP(self.cfg, self.dtype, self.param_dtype, name="mlp")(norm("post_attention_layernorm")(x))
        return x, new_cache


def init_cache(cfg: Qwen2Config, batch: int, max_len: int, dtype: jnp.dtype = jnp.float32) -> dict:
    """An empty KV cache for `max_len` positions: {"k": [L x (B, max_len, KVH, hd)], "v": same,
    "index": int32 scalar, the next slot to write}. Every array but "index" has the batch on
    axis 0 (a beam search reorders them with jax.tree.map(lambda a: a[order], ...))."""
    shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    zeros = lambda: [jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)]  # noqa: E731
    return {"k": zeros(), "v": zeros(), "index": jnp.zeros((), jnp.int32)}


class Qwen2(nn.Module):
    cfg: Qwen2Config
    dtype: jnp.dtype = jnp.float32
    """Activations and matmuls."""
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    """Recompute each decoder layer in the backward pass (gradient checkpointing)."""
    scan_layers: bool = False
    """Without a cache: run the decoder layers as one lax.scan over their stacked parameters, so
    XLA compiles one layer body instead of num_hidden_layers copies (maxtext's scan_layers). The
    parameters stay one subtree per layer (layers_{i}, 1:1 with Hugging Face and checkpoints);
    the step stacks them, one extra copy of the layer weights in its temporaries."""
    attention: str = "xla"
    """One of ATTENTION_IMPLS, for attention without a cache."""
    mesh: Mesh | None = None
    """Needed by attention "splash" (it runs per shard of this mesh)."""

    @nn.compact
    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, cache: dict | None = None,
                 prefix: dict | None = None, hidden_only: bool = False,
                 return_kv: bool = False) -> tuple[jax.Array, dict | None]:
        """Token ids (B, T) -> (logits (B, T, padded_vocab_size) float32, updated cache or None).

        `hidden_only`: return the final-norm hidden states (B, T, hidden) instead of the logits,
        for a loss that applies the head a chunk at a time (`chunked_cross_entropy`).

        `return_kv` (no cache): return {"k": [layers x (B, T, KVH, hd)], "v": same}, the keys and
        values of the T tokens, in place of the cache: a prompt's, for later rows to attend to as
        their `prefix` (a differentiable function of the parameters, unlike a decoding cache's use).

        Attention is always causal (by slot); `attention_mask` marks valid keys, (B, T), or
        (B, max_len) with a cache, e.g. False on left padding. `positions` (B, T) feed the
        rotary embedding; by default the slot numbers. With a cache the T new tokens occupy
        slots [index, index+T) and see every valid earlier slot.

        `prefix`: a cache computed earlier for Bp prompts, {"k": [layers x (Bp, Lp, KVH, hd)],
        "v": same, "mask": (Bp, Lp) valid keys}, shared by B // Bp rows each (row r belongs to
        prompt r // (B // Bp)), e.g. the beams of a beam search: every token also sees its
        prompt's valid prefix keys, which are read once per prompt rather than copied per row.
        Slots, the causal mask, `attention_mask` and `cache` cover the rows' own tokens only (the
        prefix precedes them all); positions default to the prompt's valid prefix length + slot.
        """
        cfg = self.cfg
        B, T = input_ids.shape
        if prefix is not None and B % prefix["mask"].shape[0]:
            raise ValueError(f"batch {B} is not a multiple of the prefix's {prefix['mask'].shape[0]} prompts")
        start = cache["index"] if cache is not None else 0
        slots = start + jnp.arange(T)
        if positions is None:
            positions = jnp.broadcast_to(slots, (B, T))
            if prefix is not None:
                n = jnp.sum(prefix["mask"], axis=1, dtype=jnp.int32)
                positions = positions + jnp.repeat(n, B // n.shape[0])[:, None]
        mask = None  # plain causal attention over the T tokens (fused kernels apply)
        if cache is not None or prefix is not None or attention_mask is not None:
            S = cache["k"][0].shape[1] if cache is not None else T
            mask = jnp.arange(S)[None, :] <= slots[:, None]  # (T, S) causal
            mask = jnp.broadcast_to(mask, (B, T, S))
            if attention_mask is not None:
                mask = mask & attention_mask[:, None, :].astype(bool)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)

        embed = nn.Embed(cfg.padded_vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embed_tokens")
        x = embed(input_ids)
        if return_kv and cache is not None:
            raise ValueError("return_kv: only without a cache (the cache already holds the keys and values)")
        layer_cls = nn.remat(DecoderLayer) if self.remat else DecoderLayer
        new_k, new_v = [], []
        if self.scan_layers and cache is None and not self.is_initializing():
            x, new_k, new_v = self._scan_layers(x, cos, sin, mask, prefix, return_kv)
        else:
            for i in range(cfg.num_hidden_layers):
                kv = (cache["k"][i], cache["v"][i]) if cache is not None else self._empty_kv(x) if return_kv else None
                pre = (prefix["k"][i], prefix["v"][i], prefix["mask"].astype(bool)) if prefix is not None else None
                layer = layer_cls(cfg, self.dtype, self.param_dtype, self.attention, self.mesh, name=f"layers_{i}")
                x, kv = layer(x, cos, sin, mask, kv, start, pre)
                if kv is not None:
                    new_k.append(kv[0])
                    new_v.append(kv[1])
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="norm")(x)
        new_cache = {"k": new_k, "v": new_v, "index": start + T} if cache is not None else None
        if return_kv:
            new_cache = {"k": new_k, "v": new_v}
        if not cfg.tie_word_embeddings:  # declares lm_head/kernel (on no rows); head_logits applies it
            Linear(cfg.padded_vocab_size, False, 0.02, self.dtype, self.param_dtype, name="lm_head")(x[:, :0])
        if hidden_only:
            return x, new_cache
        return head_logits(self.variables["params"], x, cfg, self.dtype), new_cache

    def _empty_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """A zero (k, v) slot for each of x's tokens: a layer writes its keys/values there (return_kv)."""
        shape = (*x.shape[:2], self.cfg.num_key_value_heads, self.cfg.head_dim)
        return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)

    def _scan_layers(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None,
                     prefix: dict | None, return_kv: bool) -> tuple[jax.Array, list, list]:
        """The decoder layers as one lax.scan over their parameters (and the prefix's per-layer
        keys/values) stacked on a new axis 0; returns (x, keys, values), the per-layer lists empty
        unless `return_kv`."""
        params = self.variables["params"]
        n = self.cfg.num_hidden_layers
        stacked = jax.tree.map(lambda *ws: jnp.stack(ws), *(params[f"layers_{i}"] for i in range(n)))
        xs = (stacked, jnp.stack(prefix["k"]), jnp.stack(prefix["v"])) if prefix is not None else (stacked,)
        layer = DecoderLayer(self.cfg, self.dtype, self.param_dtype, self.attention, self.mesh, parent=None)

        def body(h: jax.Array, per_layer: tuple) -> tuple[jax.Array, tuple | None]:
            pre = (per_layer[1], per_layer[2], prefix["mask"].astype(bool)) if prefix is not None else None
            kv = self._empty_kv(h) if return_kv else None
            h, kv = layer.apply({"params": per_layer[0]}, h, cos, sin, mask, kv, 0, pre)
            return h, kv

        if self.remat:  # as nn.remat: keep only each layer's input for the backward pass
            body = jax.checkpoint(body)
        x, kv = jax.lax.scan(body, x, xs)
        if not return_kv:
            return x, [], []
        return x, [kv[0][i] for i in range(n)], [kv[1][i] for i in range(n)]


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str, mesh: Mesh | None) -> jax.Array:
    """Causal grouped-query attention with a fused kernel: q (B, T, H, hd), k and v (B, T, KVH, hd)
    -> (B, T, H, hd). "cudnn": jax.nn.dot_product_attention's cuDNN flash attention; "splash":
    the Pallas TPU kernel, one multi-query kernel per KV head, run per shard of `mesh`."""
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if impl != "splash":
        raise ConfigError(f"attention: expected one of {ATTENTION_IMPLS}, got {impl!r}")
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, T, H, hd = q.shape
    KVH = k.shape[2]
    G = H // KVH
    block = min(512, T)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # The kernel for the devices it runs on (a TPU topology's in preflight); interpreted elsewhere (tests on CPU).
    target = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([sm.CausalMask((T, T))] * G), block_sizes=sizes,
                                              interpret=target != "tpu")

    def local(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        b, _, h, _ = q.shape
        kvh = k.shape[2]
        qg = (q * hd**-0.5).reshape(b, T, kvh, h // kvh, hd).transpose(0, 2, 3, 1, 4)  # (b, kvh, G, T, hd)
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (b, kvh, T, hd)
        out = jax.vmap(jax.vmap(kernel))(qg, kt, vt)
        return out.transpose(0, 3, 1, 2, 4).reshape(b, T, h, hd)

    if mesh is None:
        return local(q, k, v)
    spec = P(BATCH_AXES if B % _size(mesh, BATCH_AXES) == 0 else None, None,
             "tp" if KVH % mesh.shape["tp"] == 0 else None, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def _size(mesh: Mesh, axes: tuple[str, ...]) -> int:
    return int(np.prod([mesh.shape[a] for a in axes]))


def head_logits(params: dict, hidden: jax.Array, cfg: Qwen2Config, dtype: jnp.dtype) -> jax.Array:
    """The LM head on final hidden states (tied: the embedding's transpose, as flax's
    `Embed.attend`), in `dtype`: float32 logits, padded vocab columns masked."""
    if cfg.tie_word_embeddings:
        emb = params["embed_tokens"]["embedding"]
        logits = jnp.dot(hidden.astype(dtype), emb.astype(dtype).T)
    else:
        logits = matmul(hidden.astype(dtype), params["lm_head"]["kernel"].astype(dtype))
    logits = logits.astype(jnp.float32)
    if cfg.padded_vocab_size > cfg.vocab_size:
        logits = jnp.where(jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size, logits, MASK_VALUE)
    return logits


def chunked_cross_entropy(params: dict, hidden: jax.Array, targets: jax.Array, mask: jax.Array,
                          cfg: Qwen2Config, dtype: jnp.dtype, chunk: int) -> jax.Array:
    """Summed cross entropy of `targets` (B, T) where `mask`, from hidden states (B, T, hidden),
    `chunk` positions at a time. Only one chunk's (B, chunk, vocab) float32 logits exist at once
    (the backward recomputes them per chunk), never the whole sequence's: at Qwen2.5's 152k
    vocabulary those are most of a training step's memory. Same value and gradients as the
    plain softmax cross entropy of `head_logits`."""
    B, T, D = hidden.shape
    pad = -T % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    n = (T + pad) // chunk
    xs = (hidden.reshape(B, n, chunk, D).swapaxes(0, 1), targets.reshape(B, n, chunk).swapaxes(0, 1),
          mask.reshape(B, n, chunk).swapaxes(0, 1))

    @jax.checkpoint
    def one_chunk(total: jax.Array, x: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        h, y, m = x
        logits = head_logits(params, h, cfg, dtype)
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return total + jnp.sum(jnp.where(m, nll, 0.0)), None

    total, _ = jax.lax.scan(one_chunk, jnp.zeros((), jnp.float32), xs)
    return total


# Sharding rules: the named axes of each weight, by the end of its parameter path.
_AXES = [
    (r"embed_tokens/embedding", ("tp", "fsdp")),
    (r"(q_proj|k_proj|v_proj)/kernel", ("fsdp", "tp")),
    (r"(q_proj|k_proj|v_proj)/bias", ("tp",)),
    (r"o_proj/kernel", ("tp", "fsdp")),
    (r"(gate_proj|up_proj)/kernel", ("fsdp", "tp")),
    (r"down_proj/kernel", ("tp", "fsdp")),
    (r"lm_head/kernel", ("fsdp", "tp")),
]


def param_specs(params, mesh: Mesh):
    """PartitionSpecs over ("dp", "fsdp", "tp") for `params` (arrays or shape structs):
    fsdp splits the model dimension, tp the heads/hidden/vocab dimension (Megatron style).
    A dimension that does not divide by its axis size stays whole, so any model fits any mesh."""

    def spec(path, x) -> P:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        axes = next((a for pattern, a in _AXES if re.search(pattern + "$", name)), ())
        return P(*(a if x.shape[d] % mesh.shape[a] == 0 else None for d, a in enumerate(axes)))

    return jax.tree_util.tree_map_with_path(spec, params)


def num_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def flops_per_token(cfg: Qwen2Config, seq_len: int) -> float:
    """Training FLOPs per token, as nanoGPT estimates them: 6 per weight of every matmul
    (the embedding lookup is not one; the LM head, padded columns included, is), plus
    12 * layers * seq_len * heads * head_dim for attention scores and values (causal
    masking not subtracted)."""
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    matmul_params = L * (D * q + 2 * D * kv + q * D + 3 * D * F) + D * cfg.padded_vocab_size
    return 6.0 * matmul_params + 12.0 * L * seq_len * q
