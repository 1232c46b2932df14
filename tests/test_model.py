"""The GPT model and its sampler, in-process on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax.models.gpt import GPT, GPTConfig, num_params
from mllm_jax.recipes.nanogpt import generate


def tiny_model(dtype=jnp.float32):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=8)
    model = GPT(cfg, vocab_size=11, dtype=dtype)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, params


def test_causal_and_tied():
    model, params = tiny_model()
    x = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    y = x.at[0, 5].set(0)
    a, b = model.apply({"params": params}, x), model.apply({"params": params}, y)
    assert a.shape == (1, 8, 11) and a.dtype == jnp.float32
    np.testing.assert_array_equal(a[0, :5], b[0, :5])  # the future does not leak backwards
    assert not np.allclose(a[0, 5:], b[0, 5:])
    assert "lm_head" not in params  # the head is the token embedding, transposed
    assert num_params(params, non_embedding=False) - num_params(params) == 8 * 32


def test_greedy_generate_matches_cropped_loop():
    """top_k=1 sampling must equal nanoGPT's loop: crop the context to block_size, argmax."""
    model, params = tiny_model()
    prompt = [3, 1, 4]
    mesh = jax.make_mesh((1,), ("dp",))
    got = generate(model, params, prompt, 12, 1.0, 1, seed=0,
                   sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    ids = list(prompt)
    for _ in range(12):
        ctx = jnp.array([ids[-8:]])
        ids.append(int(jnp.argmax(model.apply({"params": params}, ctx)[0, -1])))
    assert got == ids[3:]


def test_bf16_compute_keeps_fp32_params_and_logits():
    model, params = tiny_model(jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    logits = model.apply({"params": params}, jnp.zeros((2, 8), jnp.int32))
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
