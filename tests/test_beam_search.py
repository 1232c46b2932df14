"""SID trie and constrained beam search, against transformers' beam search with MiniOneRec's
constraint (torch, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import REPO
from jax.sharding import AxisType

from mllm_jax.config import ConfigError
from mllm_jax.data.sid import TEMPLATE
from mllm_jax.eval.beam_search import BeamSearch, left_pad
from mllm_jax.eval.sid_trie import build_trie
from mllm_jax.models import hf
from mllm_jax.models.qwen2 import MASK_VALUE, Qwen2, init_cache
from mllm_jax.models.tiny import EOS_TOKEN, build_tokenizer, write_tiny_model
from mllm_jax.runtime import MESH_AXES

HEADER = "### Response:\n"
LEVELS = "abcd"
CODES = 8
ALL_SID_TOKENS = [f"<{level}_{c}>" for level in LEVELS for c in range(CODES)]


def mesh1():
    return jax.make_mesh((1, 1, 1), MESH_AXES, devices=jax.devices()[:1], axis_types=(AxisType.Auto,) * 3)


def random_index(seed: int, depth: int, items: int, root: int = CODES) -> dict[str, list[str]]:
    """`items` random SIDs (duplicates possible, as in real indexes); the first level uses `root` codes."""
    rng = np.random.default_rng(seed)
    return {str(i): [f"<{LEVELS[d]}_{rng.integers(root if d == 0 else CODES)}>" for d in range(depth)]
            for i in range(items)}


class MiniOneRecConstraint(transformers.LogitsProcessor):
    """MiniOneRec's ConstrainedLogitsProcessor (LogitProcessor.py) over evaluate.py's hash of
    `tokenizer("### Response:\\n{sid}\\n").input_ids + [eos]`. `prefix_index` is the number of tokens
    of "### Response:\\n" (MiniOneRec: 3 for Qwen, 4 for GPT-2-like byte-level BPEs such as ours)."""

    def __init__(self, hf_tok, sids: list[str], num_beams: int):
        self.num_beams, self.count, self.eos = num_beams, 0, hf_tok.eos_token_id
        self.prefix_index = len(hf_tok(HEADER).input_ids)
        self.hash: dict[str, set[int]] = {}
        for sid in sids:
            ids = hf_tok(f"{HEADER}{sid}\n").input_ids + [self.eos]
            for i in range(self.prefix_index, len(ids)):
                key = ids[:i] if i == self.prefix_index else ids[self.prefix_index:i]
                self.hash.setdefault("-".join(map(str, key)), set()).add(ids[i])

    def __call__(self, input_ids, scores):
        scores = torch.nn.functional.log_softmax(scores, dim=-1)
        mask = torch.full_like(scores, float("-inf"))
        for row, sent in enumerate(input_ids):
            key = sent[-self.prefix_index:] if self.count == 0 else sent[-self.count:]
            allowed = sorted(self.hash.get("-".join(map(str, key.tolist())), ()))
            if allowed:
                mask[row, allowed] = 0
            else:  # MiniOneRec forces EOS when nothing is allowed
                mask[row, self.eos] = 0
        self.count += 1
        return scores + mask


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random Qwen2 with every test SID token added (their embeddings spread out, so the
    beams' scores are well separated), as our params and as a transformers model."""
    tmp = tmp_path_factory.mktemp("beam")
    src = write_tiny_model(tmp / "src", seed=1)
    tok = hf.load_tokenizer(src)
    hf.add_tokens(tok, ALL_SID_TOKENS)
    params, cfg = hf.load_params(src, hf.load_config(src), mesh1(), np.float32, vocab_size=tok.get_vocab_size())
    emb = np.array(params["embed_tokens"]["embedding"])
    sid_ids = [tok.token_to_id(t) for t in ALL_SID_TOKENS]
    emb[sid_ids] = np.random.default_rng(0).normal(0.0, 0.3, (len(sid_ids), emb.shape[1]))
    params["embed_tokens"]["embedding"] = jnp.asarray(emb)
    model_dir = tmp / "model"
    hf.save_pretrained(model_dir, params, cfg, tok, src, dtype="float32")
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    eos = tok.token_to_id(EOS_TOKEN)
    return dict(dir=model_dir, tok=tok, params=params, cfg=cfg, torch=torch_model, hf_tok=hf_tok, eos=eos)


def prompts_for(setup, index, lengths=(1, 4, 9), seed=0) -> list[np.ndarray]:
    """Eval-style prompts with histories of the given numbers of items, ending "### Response:\\n"."""
    rng = np.random.default_rng(seed)
    sids = ["".join(t) for t in index.values()]
    out = []
    for n in lengths:
        history = ", ".join(sids[i] for i in rng.integers(len(sids), size=n))
        text = TEMPLATE.format(instruction="Can you predict the next possible item that the user may expect?",
                               input=f"Can you predict the next possible item the user may expect, given the "
                                     f"following chronological interaction history: {history}")
        ids = setup["tok"].encode(text, add_special_tokens=False).ids
        assert setup["hf_tok"](text).input_ids == ids
        out.append(np.asarray(ids, np.int32))
    header = setup["tok"].encode(HEADER, add_special_tokens=False).ids
    assert all(list(p[-len(header):]) == header for p in out)
    return out


def hf_beams(setup, index, prompts, num_beams, steps):
    """transformers' constrained beam search, as MiniOneRec's evaluate.py runs it:
    (generated tokens (B, K, steps), sequences_scores (B, K))."""
    length = max(len(p) for p in prompts)
    ids, mask = left_pad(prompts, length, setup["eos"])
    constraint = MiniOneRecConstraint(setup["hf_tok"], ["".join(t) for t in index.values()], num_beams)
    config = transformers.GenerationConfig(
        num_beams=num_beams, num_return_sequences=num_beams, length_penalty=0.0, do_sample=False,
        max_new_tokens=steps + 2, pad_token_id=setup["eos"], eos_token_id=setup["eos"], top_k=None, top_p=None)
    with torch.no_grad():
        out = setup["torch"].generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask).long(),
                                      generation_config=config, logits_processor=[constraint],
                                      return_dict_in_generate=True, output_scores=True)
    gen = out.sequences[:, length:].numpy().reshape(len(prompts), num_beams, -1)
    return gen, out.sequences_scores.numpy().reshape(len(prompts), num_beams)


@pytest.mark.parametrize("depth,num_beams,items,root", [
    (3, 20, 60, 6),  # the root has fewer children than beams: the first step fills with dead beams
    (2, 5, 30, CODES),
    (4, 5, 40, 3),
])
def test_matches_transformers_beam_search(setup, depth, num_beams, items, root):
    index = random_index(depth * 10 + num_beams, depth, items, root)
    trie = build_trie(index, setup["tok"], setup["eos"])
    assert trie.depth == depth and len(trie.valid) >= num_beams
    prompts = prompts_for(setup, index)
    gen, hf_scores = hf_beams(setup, index, prompts, num_beams, depth + len(trie.suffix))
    # transformers' beams: a valid SID, then "\n" and EOS, best first.
    assert np.all(gen[:, :, depth:depth + len(trie.suffix)] == trie.suffix)
    assert all(trie.decode(beam[:depth]) in trie.valid for row in gen for beam in row)

    search = BeamSearch(Qwen2(setup["cfg"]), trie, num_beams, mesh1())
    ids, mask = left_pad(prompts, max(len(p) for p in prompts) + 3, pad_id=0)  # extra padding changes nothing
    sids, scores = search(setup["params"], jnp.asarray(ids), jnp.asarray(mask))
    assert sids.shape == (len(prompts), num_beams, depth) and sids.dtype == jnp.int32
    assert scores.shape == (len(prompts), num_beams) and scores.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(sids), gen[:, :, :depth])
    np.testing.assert_allclose(np.asarray(scores), hf_scores, atol=1e-4, rtol=0)
    assert search.compiles() == 1


def test_fewer_items_than_beams(setup):
    """transformers pads with copies scored about -1e9; we return dead beams (-1 tokens, score -inf),
    after the same real beams."""
    index = random_index(7, 2, 12, root=3)
    trie = build_trie(index, setup["tok"], setup["eos"])
    num_beams, real = 20, len(trie.valid)
    assert real < num_beams
    prompts = prompts_for(setup, index, lengths=(2, 5))
    gen, hf_scores = hf_beams(setup, index, prompts, num_beams, 2 + len(trie.suffix))
    assert np.all(hf_scores[:, :real] > -1e3) and np.all(hf_scores[:, real:] < -1e8)

    sids, scores = BeamSearch(Qwen2(setup["cfg"]), trie, num_beams, mesh1())(
        setup["params"], *map(jnp.asarray, left_pad(prompts, 160, 0)))
    sids, scores = np.asarray(sids), np.asarray(scores)
    np.testing.assert_array_equal(sids[:, :real], gen[:, :real, :2])
    np.testing.assert_allclose(scores[:, :real], hf_scores[:, :real], atol=1e-4, rtol=0)
    assert np.all(sids[:, real:] == -1) and np.all(scores[:, real:] == -np.inf)
    decoded = trie.decode_beams(sids)
    assert all(sorted(row[:real]) == sorted(trie.valid) and row[real:] == [""] * (num_beams - real)
               for row in decoded)


def test_one_compile_per_shape_and_bf16(setup):
    index = random_index(3, 3, 50)
    trie = build_trie(index, setup["tok"], setup["eos"])
    search = BeamSearch(Qwen2(setup["cfg"]), trie, 8, mesh1())
    first = prompts_for(setup, index, lengths=(1, 3), seed=1)
    second = prompts_for(setup, index, lengths=(6, 2), seed=2)
    results = []
    for prompts in (first, second):
        ids, mask = left_pad(prompts, 192, 0)
        results.append(search(setup["params"], jnp.asarray(ids), jnp.asarray(mask)))
    assert search.compiles() == 1  # same (batch, length) bucket: no recompilation
    assert not np.array_equal(np.asarray(results[0][0]), np.asarray(results[1][0]))
    search(setup["params"], *map(jnp.asarray, left_pad(first, 224, 0)))
    assert search.compiles() == 2

    # bf16 compute: valid SIDs, scores sorted and near the float32 ones.
    bf16 = BeamSearch(Qwen2(setup["cfg"], dtype=jnp.bfloat16), trie, 8, mesh1())
    sids, scores = bf16(setup["params"], *map(jnp.asarray, left_pad(first, 192, 0)))
    assert all(s in trie.valid for row in trie.decode_beams(sids) for s in row)
    scores = np.asarray(scores)
    assert np.all(np.isfinite(scores)) and np.all(np.diff(scores, axis=1) <= 0)
    np.testing.assert_allclose(scores[:, 0], np.asarray(results[0][1])[:, 0], atol=0.2)


@pytest.mark.parametrize("tied,dtype", [(True, jnp.float32), (False, jnp.float32), (False, jnp.bfloat16)])
def test_decode_step_matches_model(tmp_path, tied, dtype):
    """The beams' decode step (the model with the prompts' cache as a shared prefix + the beams' own
    cache) gives the logits of the model's own forward over prompt + generated tokens, for tied/untied
    heads and a padded vocabulary."""
    d = write_tiny_model(tmp_path, tie_word_embeddings=tied)
    tok = hf.load_tokenizer(d)
    hf.add_tokens(tok, ALL_SID_TOKENS)
    params, cfg = hf.load_params(d, hf.load_config(d), mesh1(), np.float32, vocab_size=tok.get_vocab_size())
    assert cfg.padded_vocab_size > cfg.vocab_size
    model = Qwen2(cfg, dtype=dtype)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n) for n in (4, 7)]
    ids, mask = left_pad(prompts, 8, 0)
    gen = rng.integers(0, cfg.vocab_size, (2, 3, 3)).astype(np.int32)  # (B, K, steps)

    cache = init_cache(cfg, 2, 8, dtype)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    _, cache = model.apply({"params": params}, ids, pos, mask, cache)
    prefix = {"k": cache["k"], "v": cache["v"], "mask": mask}
    own = init_cache(cfg, 6, 3, dtype)
    lengths = mask.sum(1)
    decode = jax.jit(lambda tok, pos, own: model.apply({"params": params}, tok, pos, None, own, prefix))
    forward = jax.jit(lambda ids, pos, mask: model.apply({"params": params}, ids, pos, mask)[0][:, -1])
    for t in range(3):
        logits, own = decode(gen[:, :, t].reshape(6, 1), np.repeat(lengths, 3)[:, None] + t, own)
        # Reference: each beam's whole sequence (left-padded prompt + its tokens) through the model.
        full = np.concatenate([np.repeat(ids, 3, axis=0), gen[:, :, :t + 1].reshape(6, -1)], axis=1)
        full_mask = np.concatenate([np.repeat(mask, 3, axis=0), np.ones((6, t + 1), bool)], axis=1)
        ref = forward(full, np.maximum(np.cumsum(full_mask, 1) - 1, 0), full_mask)
        np.testing.assert_allclose(np.asarray(logits).reshape(6, -1), ref, rtol=0,
                                   atol=1e-4 if dtype == jnp.float32 else 1e-2)
        assert np.all(np.asarray(logits[..., cfg.vocab_size:]) == MASK_VALUE)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_trie_tables(depth):
    tok = build_tokenizer()
    hf.add_tokens(tok, ALL_SID_TOKENS)
    eos = tok.token_to_id(EOS_TOKEN)
    index = random_index(depth, depth, 40)
    trie = build_trie(index, tok, eos)
    assert trie.depth == depth and trie.valid == {"".join(t) for t in index.values()}
    assert list(trie.suffix) == tok.encode("\n", add_special_tokens=False).ids + [eos]
    assert trie.next_tokens.shape == trie.next_node.shape and trie.next_tokens.dtype == np.int32

    found, frontier = set(), [(0, [])]
    for level in range(depth + 1):
        nxt = []
        for node, path in frontier:
            toks, kids = trie.next_tokens[node], trie.next_node[node]
            n = int(np.sum(toks >= 0))
            assert np.all(toks[n:] == -1) and np.all(kids[n:] == -1) and np.all(kids[:n] >= 0)
            assert np.all(np.diff(toks[:n]) > 0) and np.all(kids[:n] > node)  # sorted, level-order numbering
            if level == depth:
                assert n == 0
                found.add(trie.decode(path))
            nxt += [(int(k), path + [int(t)]) for t, k in zip(toks[:n], kids[:n])]
        frontier = nxt
    assert found == trie.valid
    assert trie.num_nodes == 1 + sum(len({tuple(t[:d]) for t in index.values()}) for d in range(1, depth + 1))
    assert trie.decode([-1] * depth) == ""


def test_trie_errors_and_left_pad():
    tok = build_tokenizer()
    hf.add_tokens(tok, ALL_SID_TOKENS)
    eos = tok.token_to_id(EOS_TOKEN)
    with pytest.raises(ConfigError, match="item '1' has 2 SID tokens.*same length"):
        build_trie({"0": ["<a_1>", "<b_1>", "<c_1>"], "1": ["<a_1>", "<b_2>"]}, tok, eos)
    with pytest.raises(ConfigError, match="'<z_9>' is not a single token"):
        build_trie({"0": ["<a_1>", "<z_9>"]}, tok, eos)
    with pytest.raises(ConfigError, match="empty"):
        build_trie({}, tok, eos)

    ids, mask = left_pad([np.array([5, 6, 7]), np.array([8])], 4, pad_id=0)
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(mask, [[False, True, True, True], [False, False, False, True]])
    with pytest.raises(ValueError, match="prompt 0 has 5 tokens"):
        left_pad([np.arange(5)], 4, 0)


SHARDED_SCRIPT = textwrap.dedent("""
    import sys, jax, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from mllm_jax.eval.beam_search import BeamSearch, left_pad
    from mllm_jax.eval.sid_trie import build_trie
    from mllm_jax.models import hf
    from mllm_jax.models.qwen2 import Qwen2
    from mllm_jax.runtime import BATCH_AXES
    d = sys.argv[1]
    tok = hf.load_tokenizer(d)
    rng = np.random.default_rng(0)
    index = {str(i): [f"<a_{rng.integers(8)}>", f"<b_{rng.integers(8)}>"] for i in range(30)}
    trie = build_trie(index, tok, hf.eos_token_id(d, tok))
    prompts = [rng.integers(0, 500, n) for n in (5, 9, 3, 7)]
    ids, mask = left_pad(prompts, 12, 0)
    outs = []
    for shape in [(1, 1, 1), (2, 1, 1), (1, 1, 2)]:
        mesh = jax.make_mesh(shape, ("dp", "fsdp", "tp"), devices=jax.devices()[:int(np.prod(shape))],
                             axis_types=(AxisType.Auto,) * 3)
        params, cfg = hf.load_params(d, hf.load_config(d), mesh, np.float32)
        batch = [jax.device_put(x, NamedSharding(mesh, P(BATCH_AXES))) for x in (ids, mask)]
        sids, scores = BeamSearch(Qwen2(cfg), trie, 6, mesh)(params, *batch)
        outs.append((np.asarray(sids), np.asarray(scores)))
    for s, sc in outs[1:]:
        np.testing.assert_array_equal(s, outs[0][0])
        np.testing.assert_allclose(sc, outs[0][1], atol=1e-5)
    print("ok")
""")


def test_sharded_meshes_agree(setup):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(setup["dir"])], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_constrained_sampling_draws_from_the_tempered_model(setup):
    """BeamSearch(sample=True), the RL rollouts of rl.beam_search=false: every row a valid SID, the
    first SID token drawn with the model's probabilities at the temperature renormalised over the
    allowed tokens, each sample's score the log-prob of its tokens (rl.logprobs scores the same
    completions to within float rounding), and the same key giving the same samples."""
    from mllm_jax.rl.logprobs import completion_logps

    index = random_index(5, depth=2, items=30, root=4)
    trie = build_trie(index, setup["tok"], setup["eos"])
    model, temperature, rows = Qwen2(setup["cfg"]), 0.7, 3000
    sampler = BeamSearch(model, trie, rows, mesh1(), temperature=temperature, sample=True)
    prompt = prompts_for(setup, index, lengths=(3,))
    ids, mask = left_pad(prompt, len(prompt[0]), setup["eos"])
    sids, scores = sampler(setup["params"], ids, mask, jax.random.key(7))
    sids, scores = np.asarray(sids)[0], np.asarray(scores)[0]
    assert {trie.decode(s) for s in sids} <= trie.valid

    logits, _ = model.apply({"params": setup["params"]}, ids)
    first = trie.next_tokens[0][trie.next_tokens[0] >= 0]
    p = jax.nn.softmax(np.asarray(logits)[0, -1, first] / temperature)
    freq = np.asarray([(sids[:, 0] == t).mean() for t in first])
    np.testing.assert_allclose(freq, p, atol=0.03)

    completions = np.concatenate([sids, np.broadcast_to(trie.suffix, (rows, len(trie.suffix)))], axis=1)
    logps = completion_logps(model, setup["params"], ids, mask, completions[None, :64], temperature)
    np.testing.assert_allclose(np.asarray(logps).sum(-1)[0], scores[:64], atol=1e-4)

    again, _ = sampler(setup["params"], ids, mask, jax.random.key(7))
    other, _ = sampler(setup["params"], ids, mask, jax.random.key(8))
    assert np.array_equal(np.asarray(again)[0], sids) and not np.array_equal(np.asarray(other)[0], sids)
