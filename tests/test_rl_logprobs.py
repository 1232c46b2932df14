"""Completion log-probs with each prompt computed once (mllm_jax.rl.logprobs) against the plain
forward of every full row `prompt + completion`, the way TRL scores them: values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.models import hf
from mllm_jax.models.qwen2 import Qwen2
from mllm_jax.rl.logprobs import completion_logps, prompt_positions
from mllm_jax.runtime import make_mesh


def full_row_logps(model: Qwen2, params, prompt_ids, prompt_mask, completions, temperature):
    """The reference: each of the N x G rows run whole (prompt repeated per completion)."""
    N, G, C = completions.shape
    L = prompt_ids.shape[1]
    ids = jnp.concatenate([jnp.repeat(prompt_ids, G, axis=0), completions.reshape(N * G, C)], axis=1)
    mask = jnp.concatenate([jnp.repeat(prompt_mask, G, axis=0), jnp.ones((N * G, C), bool)], axis=1)
    logits, _ = model.apply({"params": params}, ids, prompt_positions(mask), mask)
    logits = logits[:, L - 1:-1] / temperature
    picked = jnp.take_along_axis(logits, completions.reshape(N * G, C)[..., None], axis=-1)[..., 0]
    return (picked - jax.nn.logsumexp(logits, axis=-1)).reshape(N, G, C)


@pytest.fixture(scope="module")
def tiny(tiny_qwen2):
    cfg = hf.load_config(tiny_qwen2)
    params, cfg = hf.load_params(tiny_qwen2, cfg, make_mesh("1,1,1", jax.devices()[:1]), np.float32)
    return cfg, params


def batch(vocab: int, N=3, G=4, L=9, C=5, seed=0):
    rng = np.random.default_rng(seed)
    prompt_ids = rng.integers(0, vocab, (N, L)).astype(np.int32)
    lengths = [L, 4, 1][:N]  # left padding of different lengths, down to a one-token prompt
    mask = np.arange(L)[None, :] >= L - np.asarray(lengths)[:, None]
    prompt_ids = np.where(mask, prompt_ids, 0)
    completions = rng.integers(0, vocab, (N, G, C)).astype(np.int32)
    return jnp.asarray(prompt_ids), jnp.asarray(mask), jnp.asarray(completions)


@pytest.mark.parametrize("scan,remat,temperature,grads", [(False, False, 1.0, False), (True, False, 0.7, False),
                                                          (True, True, 1.0, True)])
def test_shared_prompt_equals_full_rows_values_and_gradients(tiny, scan, remat, temperature, grads):
    """Unrolled and scanned layers give the full rows' values; the update's path (scanned layers with
    gradient checkpointing) its gradients too."""
    cfg, params = tiny
    model = Qwen2(cfg, scan_layers=scan, remat=remat)
    plain = Qwen2(cfg)
    prompt_ids, mask, completions = batch(cfg.vocab_size)
    ours = completion_logps(model, params, prompt_ids, mask, completions, temperature)
    ref = full_row_logps(plain, params, prompt_ids, mask, completions, temperature)
    assert ours.shape == completions.shape and ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)
    if not grads:
        return

    weights = jax.random.normal(jax.random.key(1), completions.shape)
    g_ours = jax.grad(lambda p: jnp.sum(weights * completion_logps(model, p, prompt_ids, mask, completions,
                                                                   temperature)))(params)
    g_ref = jax.grad(lambda p: jnp.sum(weights * full_row_logps(plain, p, prompt_ids, mask, completions,
                                                                temperature)))(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_one_token_completions(tiny):
    cfg, params = tiny
    prompt_ids, mask, completions = batch(cfg.vocab_size, C=1)
    np.testing.assert_allclose(completion_logps(Qwen2(cfg), params, prompt_ids, mask, completions),
                               full_row_logps(Qwen2(cfg), params, prompt_ids, mask, completions, 1.0), atol=2e-5)
