"""Per-token log-probabilities of completions, each prompt computed once for its whole group.

An RL batch is N prompts with G completions each (GRPO's group). TRL scores every completion as
one row `prompt + completion`, so each prompt is run G times. Here the prompt runs once: its
keys/values become the `prefix` that its G completions attend to (as the beam search shares a
prompt among its beams), the prompt's last position predicts every completion's first token, and
only the completion tokens run per row. The values and gradients are those of the full rows
(tests/test_rl_logprobs.py); the work on prompt tokens is divided by G.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mllm_jax.models.qwen2 import Qwen2, head_logits


def prompt_positions(mask: jax.Array) -> jax.Array:
    """Rotary positions of left-padded prompts: 0.. from each prompt's first real token."""
    return jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)


def completion_logps(model: Qwen2, params, prompt_ids: jax.Array, prompt_mask: jax.Array, completions: jax.Array,
                     temperature: float = 1.0) -> jax.Array:
    """log p(token) of each completion token, (N, G, C) float32.

    `prompt_ids`, `prompt_mask`: (N, L) left-padded prompts (every prompt at least one token);
    `completions`: (N, G, C) token ids, G per prompt. The distribution is the model's at
    `temperature` (log_softmax of logits / temperature, as TRL scores its samples). Tokens after
    a completion's end (padding) get log-probs too; the caller masks them."""
    cfg = model.cfg
    N, G, C = completions.shape
    mask = prompt_mask.astype(bool)
    hidden, kv = model.apply({"params": params}, prompt_ids, prompt_positions(mask), mask, hidden_only=True,
                             return_kv=True)
    first = head_logits(params, hidden[:, -1:], cfg, model.dtype)[:, None]  # (N, 1, 1, V): predicts token 0
    logits = jnp.broadcast_to(first, (N, G, 1, first.shape[-1]))
    if C > 1:  # tokens 1.. are predicted by the completion's own earlier tokens, after the shared prompt
        prefix = {"k": kv["k"], "v": kv["v"], "mask": mask}
        rest, _ = model.apply({"params": params}, completions[:, :, :-1].reshape(N * G, C - 1), prefix=prefix)
        logits = jnp.concatenate([logits, rest.reshape(N, G, C - 1, -1)], axis=2)
    logits = logits / temperature
    picked = jnp.take_along_axis(logits, completions[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)
