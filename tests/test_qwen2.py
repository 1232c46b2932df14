"""The Qwen2/Llama model and the Hugging Face loader/exporter, against transformers (torch, CPU)."""

from __future__ import annotations

import json
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
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from mllm_jax.config import ConfigError
from mllm_jax.models import hf
from mllm_jax.models.qwen2 import (MASK_VALUE, Qwen2, chunked_cross_entropy, flops_per_token, init_cache, num_params,
                                   param_specs)
from mllm_jax.models.tiny import build_tokenizer, write_tiny_model
from mllm_jax.runtime import MESH_AXES

torch.manual_seed(0)
VOCAB = 300  # not a multiple of 128: the loaded model has masked padding columns


def mesh1():
    return jax.make_mesh((1, 1, 1), MESH_AXES, devices=jax.devices()[:1], axis_types=(AxisType.Auto,) * 3)


def save_hf(tmp_path, arch="qwen2", dtype=torch.float32, **kw):
    """A tiny random transformers model saved to tmp_path; returns (dir, torch model in fp32)."""
    args = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=12345.0, tie_word_embeddings=False)
    args.update(kw)
    if arch == "qwen2":
        config = transformers.Qwen2Config(**args)
        model = transformers.Qwen2ForCausalLM(config)
        with torch.no_grad():  # random q/k/v biases (transformers initialises them to zero)
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**args))
    model.to(dtype).save_pretrained(tmp_path, max_shard_size=kw.pop("max_shard_size", None) or "5GB")
    return tmp_path, transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager").eval()


def load_ours(model_dir, vocab_size=None, mesh=None):
    cfg = hf.load_config(model_dir)
    params, cfg = hf.load_params(model_dir, cfg, mesh or mesh1(), np.float32, vocab_size)
    return Qwen2(cfg), params, cfg


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.numpy()


def ids_batch(seed=0, shape=(2, 12), vocab=VOCAB):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def assert_parity(model, params, cfg, torch_model, ids, atol=1e-4):
    ours, _ = model.apply({"params": params}, jnp.asarray(ids))
    assert ours.dtype == jnp.float32 and ours.shape == ids.shape + (cfg.padded_vocab_size,)
    np.testing.assert_allclose(ours[..., :cfg.vocab_size], torch_logits(torch_model, ids), atol=atol, rtol=0)
    assert np.all(np.asarray(ours[..., cfg.vocab_size:]) == MASK_VALUE)


@pytest.mark.parametrize("arch,tied", [("qwen2", False), ("qwen2", True), ("llama", False)])
def test_logits_match_transformers(tmp_path, arch, tied):
    model_dir, torch_model = save_hf(tmp_path, arch, tie_word_embeddings=tied)
    config = json.loads((model_dir / "config.json").read_text())
    assert "rope_theta" not in config and config["rope_parameters"]["rope_theta"] == 12345.0  # transformers 5 style
    model, params, cfg = load_ours(model_dir)
    assert cfg.rope_theta == 12345.0 and cfg.attention_bias == (arch == "qwen2") and cfg.padded_vocab_size == 384
    assert ("lm_head" in params) != tied
    assert_parity(model, params, cfg, torch_model, ids_batch())


def test_sharded_and_bf16_checkpoints(tmp_path):
    model_dir, torch_model = save_hf(tmp_path / "sharded", max_shard_size="40KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    assert_parity(*load_ours(model_dir), torch_model, ids_batch())

    model_dir, torch_model = save_hf(tmp_path / "bf16", dtype=torch.bfloat16)  # torch model: bf16 weights upcast
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert_parity(*load_ours(model_dir), torch_model, ids_batch())


def test_load_config_variants_and_errors(tmp_path):
    base = dict(model_type="qwen2", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1)

    def cfg(**kw):
        (tmp_path / "config.json").write_text(json.dumps({**base, **kw}))
        return hf.load_config(tmp_path)

    assert cfg(rope_theta=5e5, rope_scaling=None).rope_theta == 5e5  # transformers 4 style
    assert cfg(rope_parameters={"rope_type": "default", "rope_theta": 7.0}).rope_theta == 7.0
    assert cfg().rope_theta == 1e6 and cfg(model_type="llama").rope_theta == 1e4
    assert cfg().head_dim == 4 and cfg(head_dim=8).head_dim == 8
    assert not cfg(model_type="llama").attention_bias and cfg(model_type="llama", attention_bias=True).attention_bias
    for bad, match in [(dict(model_type="gpt2"), "model_type"), (dict(rope_scaling={"type": "yarn"}), "yarn"),
                       (dict(use_sliding_window=True), "sliding")]:
        with pytest.raises(ConfigError, match=match):
            cfg(**bad)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in base.items() if k != "hidden_size"}))
    with pytest.raises(ConfigError, match="hidden_size"):
        hf.load_config(tmp_path)
    with pytest.raises(ConfigError, match="base_model './nope'"):
        hf.resolve_model_dir("./nope")
    assert hf.resolve_model_dir(str(tmp_path)) == tmp_path


def sft_loss(logits, labels):
    """Token-mean cross entropy over positions with label != -100, shifted as in HF."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.sum(mask)


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_cross_entropy_equals_the_plain_loss_and_gradients(tmp_path, tied):
    """The chunked loss (one chunk's logits at a time, recomputed in the backward pass) gives the
    plain cross entropy's value and every gradient, padded vocab columns and a ragged last chunk
    included."""
    model_dir, _ = save_hf(tmp_path, tie_word_embeddings=tied)
    model, params, cfg = load_ours(model_dir, vocab_size=VOCAB + 13)  # padded vocab columns
    assert cfg.padded_vocab_size > cfg.vocab_size
    ids = jnp.asarray(ids_batch(3, (2, 10)))
    mask = jnp.ones((2, 9), bool).at[0, :4].set(False)

    def plain(p):
        logits, _ = model.apply({"params": p}, ids)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(mask, nll, 0.0))

    def chunked(p, chunk):
        hidden, _ = model.apply({"params": p}, ids, hidden_only=True)
        return chunked_cross_entropy(p, hidden[:, :-1], ids[:, 1:], mask, cfg, model.dtype, chunk)

    want, want_grads = jax.value_and_grad(plain)(params)
    for chunk in (1, 4, 9, 16):  # 4: a ragged last chunk; 16: one chunk longer than the sequence
        got, grads = jax.value_and_grad(chunked)(params, chunk)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        flat_want = dict(jax.tree_util.tree_flatten_with_path(want_grads)[0])
        for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
            np.testing.assert_allclose(g, flat_want[path], rtol=1e-5, atol=1e-6, err_msg=f"{path} chunk {chunk}")


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_layers_and_splash_attention_equal_the_plain_model(tmp_path, remat):
    """scan_layers (one lax.scan over the stacked layer weights) and the splash attention kernel
    (Pallas, interpreted on CPU) give the unrolled xla model's logits and every gradient; the
    parameters keep one subtree per layer, so HF import/export is unchanged."""
    model_dir, _ = save_hf(tmp_path, num_hidden_layers=3)
    model, params, cfg = load_ours(model_dir)
    ids = jnp.asarray(ids_batch(4, (2, 128)))

    def loss(p, m):
        logits, _ = m.apply({"params": p}, ids)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    want_logits = model.apply({"params": params}, ids)[0]
    want, want_grads = jax.value_and_grad(loss)(params, Qwen2(cfg, remat=remat))
    variants = ({"scan_layers": True}, {"attention": "splash"}, {"scan_layers": True, "attention": "splash"})
    for kw in variants[-1:] if remat else variants:  # remat: the scanned body under jax.checkpoint
        m = Qwen2(cfg, remat=remat, **kw)
        np.testing.assert_allclose(m.apply({"params": params}, ids)[0], want_logits, rtol=1e-5, atol=1e-5,
                                   err_msg=str(kw))
        got, grads = jax.value_and_grad(loss)(params, m)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert jax.tree.structure(grads) == jax.tree.structure(params)
        flat_want = dict(jax.tree_util.tree_flatten_with_path(want_grads)[0])
        for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
            np.testing.assert_allclose(g, flat_want[path], rtol=1e-4, atol=1e-6, err_msg=f"{path} {kw}")
    if remat:
        return
    # bf16 compute: splash within bf16 tolerance of xla.
    bf16 = lambda **kw: Qwen2(cfg, dtype=jnp.bfloat16, **kw).apply({"params": params}, ids)[0]  # noqa: E731
    np.testing.assert_allclose(bf16(attention="splash"), bf16(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("tied", [False, True])
def test_loss_and_gradients_match_torch(tmp_path, tied):
    model_dir, torch_model = save_hf(tmp_path, tie_word_embeddings=tied)
    _, params, cfg = load_ours(model_dir)
    ids = ids_batch(1, (2, 10))
    labels = ids.copy()
    labels[0, :4] = -100  # a masked prompt
    labels[1, :2] = -100

    out = torch_model(torch.tensor(ids, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long))
    out.loss.backward()
    torch_grads = {n: p.grad.numpy() for n, p in torch_model.named_parameters()}

    for remat in (False, True):
        def loss_fn(p, model=Qwen2(cfg, remat=remat)):
            return sft_loss(model.apply({"params": p}, jnp.asarray(ids))[0], jnp.asarray(labels))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        np.testing.assert_allclose(loss, out.loss.item(), rtol=1e-5)
        flat = jax.tree_util.tree_flatten_with_path(grads)[0]
        assert len(flat) == len(torch_grads)
        for path, g in flat:
            keys = tuple(k.key for k in path)
            g = np.asarray(g.T if keys[-1] == "kernel" else g)
            if keys[0] in ("embed_tokens", "lm_head"):
                assert not np.any(g[cfg.vocab_size:]), "padding rows must get no gradient"
                g = g[:cfg.vocab_size]
            want = torch_grads[hf.hf_name(keys)]
            err = np.linalg.norm(g - want) / np.linalg.norm(want)
            assert err < 1e-4, (hf.hf_name(keys), err)


def test_export_with_added_tokens_roundtrips_through_transformers(tmp_path):
    src = write_tiny_model(tmp_path / "src", num_hidden_layers=1)
    tok = hf.load_tokenizer(src)
    n = tok.get_vocab_size()
    assert hf.add_tokens(tok, ["<a_12>", "<b_3>", "<c_200>", "<a_12>"]) == 3
    assert hf.add_tokens(tok, ["<b_3>"]) == 0 and tok.get_vocab_size() == n + 3
    cfg = hf.load_config(src)
    params, cfg = hf.load_params(src, cfg, mesh1(), np.float32, vocab_size=tok.get_vocab_size())
    assert cfg.vocab_size == n + 3 and cfg.padded_vocab_size == 640
    emb = np.asarray(params["embed_tokens"]["embedding"])
    np.testing.assert_allclose(emb[n:n + 3], np.broadcast_to(emb[:n].mean(0), (3, emb.shape[1])), atol=1e-6)
    assert not emb[n + 3:].any()

    out = tmp_path / "out"
    hf.save_pretrained(out, params, cfg, tok, src, dtype="float32")
    text = "### Response:\n<a_12><b_3><c_200> the item<|im_end|>"
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok.encode(text).ids
    assert hf_tok.encode(text, add_special_tokens=False) == ids and {n, n + 1, n + 2} <= set(ids)
    assert hf.eos_token_id(out, tok) == tok.token_to_id("<|im_end|>") == hf_tok.eos_token_id

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert torch_model.config.vocab_size == n + 3
    ids = np.array([ids], np.int32)
    assert_parity(Qwen2(cfg), params, cfg, torch_model, ids)
    # bf16 export loads too, and our loader reads our own output back.
    hf.save_pretrained(tmp_path / "bf16", params, cfg, tok, out)
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    _, params2, cfg2 = load_ours(out)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_tiny_model_matches_transformers(tmp_path):
    d = write_tiny_model(tmp_path)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    model, params, cfg = load_ours(d)
    assert cfg.tie_word_embeddings and cfg.vocab_size == build_tokenizer().get_vocab_size()
    assert_parity(model, params, cfg, torch_model, ids_batch(2, (2, 16), cfg.vocab_size))
    n = num_params(params)
    assert n == sum(p.numel() for p in torch_model.parameters())
    assert flops_per_token(cfg, 16) > 6 * (n - cfg.vocab_size * cfg.hidden_size)


def test_kv_cache_decoding_matches_full_forward(tmp_path):
    model, params, cfg = load_ours(write_tiny_model(tmp_path))
    apply = jax.jit(lambda ids, pos, mask, cache: model.apply({"params": params}, ids, pos, mask, cache))
    ids = ids_batch(3, (2, 10), cfg.vocab_size)
    full, _ = model.apply({"params": params}, jnp.asarray(ids))

    # Prefill 6 tokens, then decode 4 one at a time, into a cache with room to spare.
    cache = init_cache(cfg, 2, 16)
    mask = jnp.ones((2, 16), bool)
    logits, cache = apply(ids[:, :6], jnp.broadcast_to(jnp.arange(6), (2, 6)), mask, cache)
    steps = [logits]
    for t in range(6, 10):
        logits, cache = apply(ids[:, t:t + 1], jnp.full((2, 1), t), mask, cache)
        steps.append(logits)
    assert int(cache["index"]) == 10
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)

    # Left-padded batch: rows of length 4 and 7; then 3 decode steps. Each row must equal
    # its own unpadded run.
    lengths, T = [4, 7], 7
    seqs = [ids[i, :n] for i, n in enumerate(lengths)]
    padded = np.zeros((2, T), np.int32)
    valid = np.zeros((2, 16), bool)
    for i, s in enumerate(seqs):
        padded[i, T - len(s):] = s
        valid[i, T - len(s):] = True
    valid[:, T:] = True
    positions = np.maximum(np.cumsum(valid[:, :T], axis=1) - 1, 0)
    logits, cache = apply(padded, positions, valid, init_cache(cfg, 2, 16))
    last = [logits[:, -1]]
    nxt = ids[:, 9:10]
    for step in range(3):
        pos = np.array([[n + step] for n in lengths])
        logits, cache = apply(nxt, pos, valid, cache)
        last.append(logits[:, -1])
    for i, s in enumerate(seqs):
        ref, _ = model.apply({"params": params}, jnp.asarray(np.concatenate([s, [ids[i, 9]] * 3])[None]))
        np.testing.assert_allclose(jnp.stack([x[i] for x in last]), ref[0, len(s) - 1:], atol=1e-5)


def test_shared_prefix_matches_repeated_prompt(tmp_path):
    """A call with `prefix` (R rows per prompt, each with its own cache) gives the logits of the plain
    cached model on each prompt repeated R times, and fills the own cache with the same keys/values."""
    model, params, cfg = load_ours(write_tiny_model(tmp_path))
    apply = jax.jit(lambda *a: model.apply({"params": params}, *a))
    R, L = 3, 6
    rng = np.random.default_rng(4)
    ids = rng.integers(0, cfg.vocab_size, (2, L)).astype(np.int32)
    valid = np.ones((2, L), bool)
    valid[0, :3] = False  # left padding
    pos = np.maximum(np.cumsum(valid, 1) - 1, 0)
    new = rng.integers(0, cfg.vocab_size, (2 * R, 3)).astype(np.int32)  # different tokens in every row
    new_pos = np.repeat(valid.sum(1), R)[:, None] + np.arange(3)

    # Reference: every prompt repeated R times in one cache, then 2 new tokens, then 1.
    mask = np.concatenate([np.repeat(valid, R, axis=0), np.ones((2 * R, 3), bool)], axis=1)
    _, cache = apply(np.repeat(ids, R, axis=0), np.repeat(pos, R, axis=0), mask, init_cache(cfg, 2 * R, L + 3))
    want_a, cache = apply(new[:, :2], new_pos[:, :2], mask, cache)
    want_b, cache = apply(new[:, 2:], new_pos[:, 2:], mask, cache)

    # Prefix: each prompt's cache once, shared by its R rows; the own cache holds the new tokens only.
    _, pcache = apply(ids, pos, valid, init_cache(cfg, 2, L))
    prefix = {"k": pcache["k"], "v": pcache["v"], "mask": valid}
    prefixed = jax.jit(lambda ids, pos, own: model.apply({"params": params}, ids, pos, None, own, prefix))
    got_a, own = prefixed(new[:, :2], None, init_cache(cfg, 2 * R, 3))  # default positions: prompt length + slot
    got_b, own = prefixed(new[:, 2:], new_pos[:, 2:], own)
    np.testing.assert_allclose(got_a, want_a, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_b, want_b, atol=1e-5, rtol=0)
    assert int(own["index"]) == 3
    for a, b in zip(own["k"] + own["v"], cache["k"] + cache["v"]):
        np.testing.assert_allclose(a, b[:, L:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not a multiple"):
        model.apply({"params": params}, new[:5], prefix=prefix)


def test_param_specs_rules():
    shapes = {"embed_tokens": {"embedding": jax.ShapeDtypeStruct((512, 64), np.float32)},
              "layers_0": {"self_attn": {"q_proj": {"kernel": jax.ShapeDtypeStruct((64, 64), np.float32),
                                                    "bias": jax.ShapeDtypeStruct((64,), np.float32)},
                                         "k_proj": {"kernel": jax.ShapeDtypeStruct((64, 6), np.float32)},
                                         "o_proj": {"kernel": jax.ShapeDtypeStruct((64, 64), np.float32)}},
                           "mlp": {"down_proj": {"kernel": jax.ShapeDtypeStruct((128, 63), np.float32)}},
                           "input_layernorm": {"scale": jax.ShapeDtypeStruct((64,), np.float32)}},
              "lm_head": {"kernel": jax.ShapeDtypeStruct((64, 512), np.float32)}}
    specs = param_specs(shapes, AbstractMesh((2, 2, 4), MESH_AXES))
    assert specs["embed_tokens"]["embedding"] == P("tp", "fsdp")
    attn = specs["layers_0"]["self_attn"]
    assert attn["q_proj"]["kernel"] == P("fsdp", "tp") and attn["q_proj"]["bias"] == P("tp")
    assert attn["k_proj"]["kernel"] == P("fsdp", None)  # 6 does not split over tp=4
    assert attn["o_proj"]["kernel"] == P("tp", "fsdp")
    assert specs["layers_0"]["mlp"]["down_proj"]["kernel"] == P("tp", None)
    assert specs["layers_0"]["input_layernorm"]["scale"] == P()
    assert specs["lm_head"]["kernel"] == P("fsdp", "tp")


MESH_SCRIPT = textwrap.dedent("""
    import sys, jax, numpy as np
    from mllm_jax.models import hf
    from mllm_jax.models.qwen2 import Qwen2
    from mllm_jax.models.tiny import write_tiny_model
    d = write_tiny_model(sys.argv[1], tie_word_embeddings=False)
    ids = np.random.default_rng(0).integers(0, 512, (8, 12)).astype(np.int32)
    outs = []
    for shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2)]:
        mesh = jax.make_mesh(shape, ("dp", "fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
        params, cfg = hf.load_params(d, hf.load_config(d), mesh, np.float32, vocab_size=515)
        q = params["layers_0"]["self_attn"]["q_proj"]["kernel"]
        assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.size == q.size // (shape[1] * shape[2])
        logits = jax.jit(lambda p, x: Qwen2(cfg).apply({"params": p}, x)[0])(params, ids)
        outs.append(np.asarray(logits[..., :515]))
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], atol=1e-5)
    print("ok")
""")


def test_sharded_meshes_agree(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
