"""SID evaluation decoding on CPU: our constrained beam search (mllm_jax.eval.beam_search) vs
transformers `generate` with MiniOneRec's constraint, on the same small Qwen2 and the same prompts.

    python benchmarks/beam_search.py [--prompts 32] [--batch 4] [--beams 50]

The model is a random Qwen2 (hidden 256, 4 layers, 8 heads / 4 KV heads, SwiGLU 768) written by
`write_tiny_model`, with the SID tokens of the shared Industrial index added (random embedding and
LM-head rows, N(0, 0.1), so that SIDs do not tie); both sides load the same Hugging Face directory
(fp32). The prompts are MiniOneRec's next-item eval prompts for the first `--prompts` rows of the
Industrial test CSV, in file order, in batches of `--batch` (evaluate.py's default is 4). The PyTorch
side is evaluate.py's call: `generate(num_beams=K, num_return_sequences=K, length_penalty=0.0,
do_sample=False)` on left-padded batches with its ConstrainedLogitsProcessor over the hash of
`tokenizer("### Response:\\n{sid}\\n") + [eos]` (sdpa attention), after one warm-up prompt. Ours pads
each batch to a multiple of 64 tokens (one compiled program per length bucket, compiled and timed
apart on one batch per bucket before the timed pass), and decodes the beams to SID strings. Each
side runs once, in its own process; the first batch's beams of the two are compared. The jax side
also times its prefill alone (the same model calls on the same batches), to show where its time
goes. Needs torch and transformers (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AMAZON = REPO.parent / "shared" / "data" / "MiniOneRec" / "data" / "Amazon"
INDEX = AMAZON / "index" / "Industrial_and_Scientific.index.json"
TEST_CSV = AMAZON / "test" / "Industrial_and_Scientific_5_2016-10-2018-11.csv"
MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, tie_word_embeddings=False)
HEADER = "### Response:\n"
BUCKET = 64


def eval_prompts(n: int) -> list[str]:
    """MiniOneRec's EvalSidDataset prompts for the first n rows of the test CSV."""
    from mllm_jax.data.sid import TEMPLATE

    out = []
    with TEST_CSV.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if len(out) == n:
                break
            history = ", ".join(ast.literal_eval(row["history_item_sid"]))
            out.append(TEMPLATE.format(
                instruction="Can you predict the next possible item that the user may expect?",
                input="Can you predict the next possible item the user may expect, given the following "
                      f"chronological interaction history: {history}"))
    return out


def load(model_dir: str, n: int):  # type: ignore[no-untyped-def]
    from mllm_jax.data.sid import load_index
    from mllm_jax.models import hf

    tok = hf.load_tokenizer(model_dir)
    eos = hf.eos_token_id(model_dir, tok)
    prompts = [e.ids for e in tok.encode_batch(eval_prompts(n), add_special_tokens=False)]
    return tok, eos, load_index(str(INDEX)), prompts


def jax_side(model_dir: str, n: int, batch: int, beams: int) -> dict:
    import jax
    import numpy as np

    from mllm_jax import runtime
    from mllm_jax.eval.beam_search import BeamSearch, left_pad
    from mllm_jax.eval.sid_trie import build_trie
    from mllm_jax.models import hf
    from mllm_jax.models.qwen2 import Qwen2, init_cache

    runtime.tune_host_allocator()
    tok, eos, index, prompts = load(model_dir, n)
    mesh = runtime.make_mesh("auto")
    params, cfg = hf.load_params(model_dir, hf.load_config(model_dir), mesh, np.float32)
    trie = build_trie(index, tok, eos)
    search = BeamSearch(Qwen2(cfg), trie, beams, mesh)
    sharding = runtime.batch_sharding(mesh)

    def inputs(chunk):
        length = -(-max(len(p) for p in chunk) // BUCKET) * BUCKET
        ids, mask = left_pad([np.asarray(p) for p in chunk], length, eos)
        return jax.device_put(ids, sharding), jax.device_put(mask, sharding)

    batches = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    shapes: dict[tuple, list] = {}
    for chunk in batches:
        shapes.setdefault((len(chunk), inputs(chunk)[0].shape[1]), chunk)
    t = time.perf_counter()
    for chunk in shapes.values():  # compile every (batch, length) bucket
        jax.block_until_ready(search(params, *inputs(chunk)))
    compile_s = time.perf_counter() - t

    t = time.perf_counter()
    first = None
    for chunk in batches:
        sids, scores = search(params, *inputs(chunk))
        beams_out = trie.decode_beams(sids)  # to host, as the evaluation needs the strings
        first = first or (beams_out, np.asarray(scores).tolist())
    sec = time.perf_counter() - t

    # Where the time goes: the search's prefill alone (the same two model calls, same inputs).
    def prefill_fn(p, ids, mask):
        model, pos = Qwen2(cfg), jax.numpy.maximum(jax.numpy.cumsum(mask, 1) - 1, 0)
        cache = init_cache(cfg, ids.shape[0], ids.shape[1])
        _, cache = model.apply({"params": p}, ids[:, :-1], pos[:, :-1], mask, cache)
        return model.apply({"params": p}, ids[:, -1:], pos[:, -1:], mask, cache)[0]

    prefill = jax.jit(prefill_fn)
    for chunk in shapes.values():
        jax.block_until_ready(prefill(params, *inputs(chunk)))
    t = time.perf_counter()
    for chunk in batches:
        jax.block_until_ready(prefill(params, *inputs(chunk)))
    prefill_s = time.perf_counter() - t
    return {"sec": sec, "compile_sec": compile_s, "compiles": search.compiles(), "prefill_sec": prefill_s,
            "first_beams": first[0], "first_scores": first[1],
            "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))]}


def constrained_processor(hf_tok, index: dict, eos: int):  # type: ignore[no-untyped-def]
    """MiniOneRec's ConstrainedLogitsProcessor (LogitProcessor.py) over evaluate.py's hash of allowed next
    tokens of `tokenizer("### Response:\\n{sid}\\n") + [eos]`: returns a function making a fresh processor
    for each `generate` call (it counts the decoding steps)."""
    import torch
    from transformers import LogitsProcessor

    prefix_index = len(hf_tok(HEADER).input_ids)  # MiniOneRec: 3 for Qwen's tokenizer, 4 for GPT-2-like ones
    hash_dict: dict[str, set[int]] = {}
    for sid in ("".join(t) for t in index.values()):
        ids = hf_tok(f"{HEADER}{sid}\n").input_ids + [eos]
        for i in range(prefix_index, len(ids)):
            key = ids[:i] if i == prefix_index else ids[prefix_index:i]
            hash_dict.setdefault("-".join(map(str, key)), set()).add(ids[i])
    allowed_of = {k: list(v) for k, v in hash_dict.items()}

    class ConstrainedLogitsProcessor(LogitsProcessor):
        def __init__(self) -> None:
            self.count = 0

        def __call__(self, input_ids, scores):
            scores = torch.nn.functional.log_softmax(scores, dim=-1)
            mask = torch.full_like(scores, float("-inf"))
            for row, sent in enumerate(input_ids):
                key = sent[-prefix_index:] if self.count == 0 else sent[-self.count:]
                allowed = allowed_of.get("-".join(map(str, key.tolist())), [])
                mask[row, allowed if allowed else [eos]] = 0
            self.count += 1
            return scores + mask

    return ConstrainedLogitsProcessor


def torch_side(model_dir: str, n: int, batch: int, beams: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok, eos, index, prompts = load(model_dir, n)
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    processor = constrained_processor(hf_tok, index, eos)
    config = GenerationConfig(num_beams=beams, num_return_sequences=beams, length_penalty=0.0, do_sample=False,
                              max_new_tokens=256, pad_token_id=eos, eos_token_id=eos, top_k=None, top_p=None)
    id_to_token = {tok.token_to_id(t): t for tokens in index.values() for t in tokens}

    def run(chunk):
        length = max(len(p) for p in chunk)
        ids = torch.tensor([[eos] * (length - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, generation_config=config, logits_processor=[processor()],
                                 return_dict_in_generate=True, output_scores=True)
        sids = ["".join(id_to_token.get(t, "") for t in seq[length:].tolist()) for seq in out.sequences]
        return ([sids[i:i + beams] for i in range(0, len(sids), beams)],
                out.sequences_scores.reshape(len(chunk), beams).tolist())

    batches = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    run(batches[0][:1])  # warm-up
    t = time.perf_counter()
    first = None
    for chunk in batches:
        result = run(chunk)
        first = first or result
    return {"sec": time.perf_counter() - t, "first_beams": first[0], "first_scores": first[1],
            "threads": torch.get_num_threads()}


def prepare(out_dir: Path) -> str:
    """The benchmark model: a random Qwen2 with the index's SID tokens added, in HF format."""
    import numpy as np

    from mllm_jax import runtime
    from mllm_jax.data.sid import load_index, sid_tokens
    from mllm_jax.models import hf
    from mllm_jax.models.tiny import write_tiny_model

    src = write_tiny_model(out_dir / "src", **MODEL)
    tok = hf.load_tokenizer(src)
    hf.add_tokens(tok, sid_tokens(load_index(str(INDEX))))
    params, cfg = hf.load_params(src, hf.load_config(src), runtime.make_mesh("auto"), np.float32,
                                 vocab_size=tok.get_vocab_size())
    # Added tokens start as the mean embedding, so every SID would tie; random rows make the beams
    # (and the comparison of the two sides) well defined.
    rng = np.random.default_rng(0)
    new = np.arange(hf.load_config(src).vocab_size, cfg.vocab_size)
    emb, head = np.array(params["embed_tokens"]["embedding"]), np.array(params["lm_head"]["kernel"])
    emb[new] = rng.normal(0.0, 0.1, (len(new), emb.shape[1]))
    head[:, new] = rng.normal(0.0, 0.1, (head.shape[0], len(new)))
    params["embed_tokens"]["embedding"], params["lm_head"]["kernel"] = emb, head
    hf.save_pretrained(out_dir / "model", params, cfg, tok, src, dtype="float32")
    return str(out_dir / "model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--beams", type=int, default=50)
    parser.add_argument("--side", choices=["jax", "torch", "prepare"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "prepare":
        print(json.dumps(prepare(Path(args.model_dir))))
        return
    if args.side:
        fn = jax_side if args.side == "jax" else torch_side
        print(json.dumps(fn(args.model_dir, args.prompts, args.batch, args.beams)))
        return

    def child(side: str, model_dir: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--side", side, "--model-dir", model_dir,
                              "--prompts", str(args.prompts), "--batch", str(args.batch), "--beams", str(args.beams)],
                             capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu", **_env()})
        if out.returncode:
            sys.exit(f"{side} side failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = child("prepare", tmp)
        results = {side: child(side, model_dir) for side in ("torch", "jax")}

    j, t = results["jax"], results["torch"]
    n = args.prompts
    print(f"Qwen2 {MODEL}, fp32, CPU; {n} Industrial test prompts ({j['prompt_tokens'][0]}-{j['prompt_tokens'][1]} "
          f"tokens) in batches of {args.batch}, {args.beams} beams, one run")
    print(f"{'side':8s}{'sec':>9s}{'prompts/s':>11s}")
    for s in ("torch", "jax"):
        print(f"{s:8s}{results[s]['sec']:9.2f}{n / results[s]['sec']:11.2f}")
    print(f"speed-up (prompts/s, jax / torch): {t['sec'] / j['sec']:.1f}x   (torch threads {t['threads']}; jax "
          f"compilation {j['compile_sec']:.1f} s for {j['compiles']} length buckets, not in the timed pass; "
          f"prefill alone {j['prefill_sec']:.2f} s of the jax {j['sec']:.2f} s)")
    same = sum(a == b for ra, rb in zip(j["first_beams"], t["first_beams"]) for a, b in zip(ra, rb))
    total = sum(len(r) for r in t["first_beams"])
    diff = max(abs(a - b) for ra, rb in zip(j["first_scores"], t["first_scores"]) for a, b in zip(ra, rb))
    print(f"first batch: {same}/{total} beams identical (same SID at the same rank), max |score diff| {diff:.2e}")


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}


if __name__ == "__main__":
    main()
