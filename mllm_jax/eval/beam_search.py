"""Constrained beam search over the SID trie, in JAX with the KV cache: MiniOneRec's evaluation
decoding (transformers `generate(num_beams=K, num_return_sequences=K, length_penalty=0.0,
do_sample=False)` with its ConstrainedLogitsProcessor), compiled once per batch shape.

What transformers does there, and what we do (tests/test_beam_search.py checks it against
transformers itself):

- Scores are sums of log-probs over the whole vocabulary (log_softmax of the float32 logits; the
  processor sets disallowed tokens to -inf without renormalising), and with length_penalty 0 a
  sequence's final score is that plain sum, "\\n" and EOS included.
- Beams start from the prompt with scores [0, -1e9, ...]: the first step draws its K candidates from
  one beam. Every step keeps the K best (beam, allowed token) continuations, best first (ties: the
  lower beam, then the lower token id, i.e. the lower flat index; torch's topk does not promise an
  order for exact ties). No sequence ends before `depth` SID tokens + the suffix, where all end
  together, so the result is the K best of the final step, sorted by their full scores.
- We compute only what can matter: the prompt is prefilled once per prompt (transformers prefills it
  once per beam, and copies its whole cache at every step to reorder the beams); its KV cache is
  shared by the prompt's beams as the model's `prefix` (read once per prompt, not once per beam), and
  the beams' own cache holds only their generated tokens' keys/values (depth + suffix - 1 slots,
  reordered at each step); each step gathers the log-probs of each beam's trie children
  only (a logsumexp over the vocabulary, no masked copy of it). The steps run in one lax.scan.
- Fewer valid continuations than beams (a root with fewer than K children, or fewer than K items):
  transformers then fills the missing beams with copies of real prefixes scored about -1e9, which
  drop out as soon as K real continuations exist. We keep such beams as dead ones, score -inf and
  tokens -1 (SidTrie.decode gives ""), so the real beams, their order and scores are the same, and
  when the index has fewer than K items the extra beams are -inf / "" rather than -1e9 duplicates.
- MiniOneRec keys the first step on the prompt's last tokens ("### Response:\\n"); here the root is
  that key, so prompts must end with the response header, as the eval prompts do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mllm_jax.config import ConfigError
from mllm_jax.eval.sid_trie import SidTrie
from mllm_jax.models.qwen2 import Qwen2, init_cache
from mllm_jax.runtime import BATCH_AXES


def left_pad(prompts: list[np.ndarray], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-id prompts -> (ids (N, length) int32 left-padded with pad_id, mask (N, length) bool,
    True on the prompt tokens)."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, p in enumerate(prompts):
        p = np.asarray(p, np.int32).reshape(-1)
        if not 0 < len(p) <= length:
            raise ValueError(f"prompt {row} has {len(p)} tokens: expected 1..{length}")
        ids[row, length - len(p):] = p
        mask[row, length - len(p):] = True
    return ids, mask


def _search_tables(trie: SidTrie) -> tuple[np.ndarray, np.ndarray, int]:
    """The trie's tables extended with the suffix and a dead node: every leaf's only child is
    suffix[0], then a chain of one-child nodes spells the rest of the suffix; the dead node (the
    last row) has no children. Returns (next_tokens, next_node, dead)."""
    n, width = trie.next_tokens.shape
    m = len(trie.suffix)
    tokens = np.full((n + m + 1, max(width, 1)), -1, np.int32)
    nodes = np.full_like(tokens, -1)
    tokens[:n, :width], nodes[:n, :width] = trie.next_tokens, trie.next_node
    leaves = np.flatnonzero((trie.next_tokens < 0).all(axis=1))
    tokens[leaves, 0], nodes[leaves, 0] = trie.suffix[0], n
    for i in range(1, m):
        tokens[n + i - 1, 0], nodes[n + i - 1, 0] = trie.suffix[i], n + i
    return tokens, nodes, n + m


class BeamSearch:
    """K-beam search constrained to the SIDs of `trie`, then its forced "\\n" + EOS suffix; or,
    with `sample=True`, K independent samples per prompt under the same constraint (RL rollouts).

    `search(params, input_ids, attention_mask)` (or calling the object) takes (B, L) left-padded
    prompts (global arrays, the batch over BATCH_AXES; every prompt must end with "### Response:\\n")
    and returns (sid_tokens (B, K, depth) int32, scores (B, K) float32), best first; dead beams (fewer
    than K items reachable) are -1 / -inf. One jitted program per (B, L): a bucketed batch shape
    compiles once (`compiles()` counts them). `model` may compute in bfloat16 (its dtype); the
    scores are float32 sums either way. `mesh` None: no sharding constraints (one device).

    `temperature`: log-probs of logits / temperature (MiniOneRec's RL rollouts put a temperature
    warper before the constraint: log_softmax(log_softmax(logits) / T) is log_softmax(logits / T)).
    `sample`: each of the K rows of a prompt draws its next token from its allowed children, with
    probabilities proportional to exp(log-prob) (Gumbel-max; transformers' do_sample with the
    constraint), from `key` (an argument of the call: the same key gives the same samples on any
    mesh); rows are not reordered and sorted by nothing. Scores are the samples' summed log-probs.
    """

    def __init__(self, model: Qwen2, trie: SidTrie, num_beams: int, mesh: Mesh | None = None,
                 temperature: float = 1.0, sample: bool = False):
        if not isinstance(num_beams, int) or num_beams < 1:
            raise ConfigError(f"num_beams: expected a positive integer, got {num_beams!r}")
        if not temperature > 0:
            raise ConfigError(f"temperature: expected a positive number, got {temperature!r}")
        self.temperature, self.sample = float(temperature), sample
        used = [*trie.id_to_token, *trie.suffix.tolist()]
        if max(used) >= model.cfg.vocab_size or min(used) < 0:
            raise ConfigError(f"SID trie: token id {max(used)} is outside the model's vocabulary of "
                              f"{model.cfg.vocab_size} (load the params with the SID tokens added)")
        self.model, self.trie, self.num_beams, self.mesh = model, trie, num_beams, mesh
        self.depth = trie.depth
        self.steps = trie.depth + len(trie.suffix)
        tokens, nodes, self._dead = _search_tables(trie)
        self._width = tokens.shape[1]
        self.tables = (tokens, nodes)
        """The trie's tables (numpy), the last two arguments of `jitted`."""
        self._placed: tuple[jax.Array, ...] | None = None
        self.jitted = jax.jit(self._run)
        """The program: (params, input_ids, attention_mask, *tables, key data) -> (sids, scores)."""

    def __call__(self, params, input_ids: jax.Array, attention_mask: jax.Array,
                 key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        if self._placed is None:  # on the devices at first use (preflight only compiles `jitted`)
            if self.mesh is None:
                self._placed = tuple(jnp.asarray(x) for x in self.tables)
            else:  # replicated; built from each process's own copy, so multi-host works too
                self._placed = tuple(jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, P()),
                                                                  lambda i, x=x: x[i]) for x in self.tables)
        if self.sample and key is None:
            raise ValueError("BeamSearch(sample=True) needs a PRNG key")
        # The key travels as host data (replicated on any mesh, several processes too).
        raw = np.asarray(jax.random.key_data(jax.random.key(0) if key is None else key))
        return self.jitted(params, input_ids, attention_mask, *self._placed, raw)

    search = __call__

    def abstract_args(self, params, prompts: int, length: int) -> tuple:
        """`jitted`'s arguments as shapes, for compiling it without data (preflight): `params`
        (abstract), `prompts` prompts of `length` tokens split over the data-parallel axes."""
        assert self.mesh is not None
        batch, replicated = NamedSharding(self.mesh, P(BATCH_AXES)), NamedSharding(self.mesh, P())
        return (params, jax.ShapeDtypeStruct((prompts, length), jnp.int32, sharding=batch),
                jax.ShapeDtypeStruct((prompts, length), jnp.bool_, sharding=batch),
                *(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated) for x in self.tables),
                jax.ShapeDtypeStruct(jax.random.key_data(jax.random.key(0)).shape, np.uint32, sharding=replicated))

    def compiles(self) -> int:
        """How many programs were compiled so far (one per distinct input shape)."""
        return self.jitted._cache_size()

    # ------------------------------------------------------------------------------ the program

    def _constrain(self, x: jax.Array, *rest) -> jax.Array:
        """Batch axis (0) of x over the data-parallel axes, if it divides; `rest` for later axes."""
        if self.mesh is None:
            return x
        dp = int(np.prod([self.mesh.shape[a] for a in BATCH_AXES]))
        if x.shape[0] % dp:
            return x
        rest = tuple(a if a is None or x.shape[i + 1] % self.mesh.shape[a] == 0 else None
                     for i, a in enumerate(rest))
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(BATCH_AXES, *rest)))

    def _run(self, params, input_ids, attention_mask, next_tokens, next_node, key_data):
        key = jax.random.wrap_key_data(key_data)
        model, cfg = self.model, self.model.cfg
        K, T, C = self.num_beams, self.steps, self._width
        B, L = input_ids.shape
        G = T - 1  # every generated token but the last (EOS) is fed back
        input_ids = self._constrain(input_ids)
        mask = self._constrain(attention_mask.astype(bool))
        prompt_len = jnp.sum(mask, axis=1, dtype=jnp.int32)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)

        # Prefill once per prompt. All but the last token first: their logits are unused, so XLA
        # drops that LM-head matmul; the last token then gives the first step's logits.
        def apply(ids, pos, cache):
            return model.apply({"params": params}, ids, pos, mask, cache)

        def new_cache(rows: int, length: int) -> dict:  # rows over the batch axes, KV heads over tp
            cache = init_cache(cfg, rows, length, model.dtype)
            return {**cache, "k": [self._constrain(a, None, "tp") for a in cache["k"]],
                    "v": [self._constrain(a, None, "tp") for a in cache["v"]]}

        cache = new_cache(B, L)
        if L > 1:
            _, cache = apply(input_ids[:, :-1], positions[:, :-1], cache)
        logits, cache = apply(input_ids[:, -1:], positions[:, -1:], cache)
        # The prompt's cache becomes the beams' shared prefix; each beam's own cache (rows b*K..b*K+K-1
        # for prompt b) holds only its generated tokens.
        prefix = {"k": cache["k"], "v": cache["v"], "mask": mask}

        def children_logp(logits, node):
            """log-probs (B, K, C) of each beam's children; logits (B, K, V), node (B, K)."""
            toks = next_tokens[node]
            logits = logits / self.temperature
            lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
            return jnp.take_along_axis(logits, jnp.maximum(toks, 0), axis=-1) - lse

        node = jnp.zeros((B, K), jnp.int32)
        cand_lp = children_logp(jnp.broadcast_to(logits[:, :1], (B, K, logits.shape[-1])), node)
        start = jnp.zeros((B, K), jnp.float32)
        if not self.sample:  # one beam to start from; sampling rows are independent from the start
            start = start.at[:, 1:].set(-jnp.inf)
        scores = self._constrain(start)
        hist = jnp.full((B, K, T), -1, jnp.int32)
        gen = new_cache(B * K, G)

        def select(scores, node, hist, cand_lp, t):
            toks, kids = next_tokens[node], next_node[node]  # (B, K, C)
            if self.sample:  # Gumbel-max over each row's own children: a draw from their softmax
                noise = jax.random.gumbel(jax.random.fold_in(key, t), (B, K, C))
                pick = jnp.argmax(jnp.where(toks >= 0, cand_lp + noise, -jnp.inf), axis=-1)
                parent = jnp.broadcast_to(jnp.arange(K), (B, K))
                flat = parent * C + pick
                top = scores + jnp.take_along_axis(jnp.where(toks >= 0, cand_lp, -jnp.inf), pick[..., None],
                                                   axis=-1)[..., 0]
            else:
                cand = jnp.where(toks >= 0, scores[..., None] + cand_lp, -jnp.inf).reshape(B, K * C)
                top, flat = jax.lax.top_k(cand, K)
                parent = flat // C
            alive = top > -jnp.inf
            tok = jnp.where(alive, jnp.take_along_axis(toks.reshape(B, K * C), flat, axis=1), -1)
            node = jnp.where(alive, jnp.take_along_axis(kids.reshape(B, K * C), flat, axis=1), self._dead)
            hist = jnp.take_along_axis(hist, parent[..., None], axis=1)
            hist = jax.lax.dynamic_update_slice(hist, tok[..., None], (0, 0, t))
            return top, node, hist, tok, parent

        def follow(a, parent):  # each beam's generated keys/values come from its parent beam
            a = a.reshape((B, K) + a.shape[1:])
            return jnp.take_along_axis(a, parent.reshape((B, K) + (1,) * (a.ndim - 2)), axis=1).reshape(
                (B * K,) + a.shape[2:])

        def step(carry, t):
            scores, node, hist, cand_lp, gen = carry
            scores, node, hist, tok, parent = select(scores, node, hist, cand_lp, t)
            gen = {"k": [follow(a, parent) for a in gen["k"]], "v": [follow(a, parent) for a in gen["v"]],
                   "index": t}
            pos = jnp.broadcast_to(prompt_len[:, None] + t, (B, K)).reshape(B * K, 1)
            logits, gen = model.apply({"params": params}, jnp.maximum(tok, 0).reshape(B * K, 1), pos, None, gen,
                                      prefix)
            logits = logits.reshape(B, K, -1)
            return (scores, node, hist, children_logp(logits, node), gen), None

        carry = (scores, node, hist, cand_lp, gen)
        (scores, node, hist, cand_lp, _), _ = jax.lax.scan(step, carry, jnp.arange(G))
        scores, _, hist, _, _ = select(scores, node, hist, cand_lp, T - 1)
        sids = jnp.where((scores > -jnp.inf)[..., None], hist[:, :, :self.depth], -1)
        return self._constrain(sids), self._constrain(scores)
