"""SID SFT step on CPU: our jitted step vs transformers/PyTorch forward + backward + AdamW,
on the same small Qwen2, the same batches, measured side by side in one run.

    python benchmarks/sft_step.py [--rounds 3] [--steps 10] [--warmup 3]

The model is a random Qwen2 (hidden 256, 4 layers, 8 heads / 4 KV heads, SwiGLU 768) written
by `write_tiny_model` in Hugging Face format; both sides load that directory, add the SID
tokens of the shared Industrial index and train on the same MiniOneRec batches (global batch
16, sequences padded to the split's longest, fp32, AdamW, grad clip 1). The JAX side is the
recipe's own SFTTask step; the PyTorch side is transformers' Qwen2ForCausalLM (sdpa attention)
with torch.optim.AdamW, as MiniOneRec's trainer runs it, minus its data loader. Each side runs
in a fresh process, alternating rounds. Needs torch and transformers (`pip install -e '.[test]'`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, tie_word_embeddings=False)
GLOBAL_BATCH = 16


def overrides(model_dir: str) -> list[str]:
    amazon = REPO.parent / "shared" / "data" / "MiniOneRec" / "data" / "Amazon"
    return [f"base_model={model_dir}", "export_hf=false", "data.eval_file=''", "data.max_len=256",
            "train.load_best_model_at_end=false", "train.early_stopping_patience=0",
            "data.sample_train=256", f"train.global_batch_size={GLOBAL_BATCH}",
            f"train.per_device_train_batch_size={GLOBAL_BATCH}", "train.warmup_steps=0", "train.lr_schedule=constant",
            f"data.train_file={amazon / 'valid' / 'Industrial_and_Scientific_5_2016-10-2018-11.csv'}",
            f"data.sid_index_path={amazon / 'index' / 'Industrial_and_Scientific.index.json'}",
            f"data.item_meta_path={amazon / 'index' / 'Industrial_and_Scientific.item.json'}"]


def prepare(model_dir: str):  # type: ignore[no-untyped-def]
    from mllm_jax import runtime
    from mllm_jax.config import load_config
    from mllm_jax.recipes import sft

    cfg = load_config(sft.Config, REPO / "configs" / "sft" / "cpu_smoke.yaml", overrides(model_dir))
    mesh = runtime.make_mesh(cfg.jax.mesh_shape)
    return cfg, mesh, sft.prepare(cfg, mesh)


def jax_side(model_dir: str, steps: int, warmup: int) -> dict:
    import jax

    from mllm_jax import runtime
    from mllm_jax.recipes import sft

    runtime.tune_host_allocator()
    cfg, mesh, prep = prepare(model_dir)
    task = sft.SFTTask(cfg, mesh, prep)
    state = task.state
    losses = []
    for step in range(warmup):
        state, metrics = task.train_step(state, step)
        losses.append(float(metrics["loss"]))
    t = time.perf_counter()
    for step in range(warmup, warmup + steps):  # async dispatch, as in the trainer's loop
        state, metrics = task.train_step(state, step)
    jax.block_until_ready(metrics)
    return {"sec_per_step": (time.perf_counter() - t) / steps, "tokens_per_step": task.tokens(0),
            "flops_per_token": task.flops_per_token, "peak_flops": runtime.measure_matmul_flops(),
            "first_loss": losses[0]}


def torch_side(model_dir: str, steps: int, warmup: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from mllm_jax import runtime
    from mllm_jax.recipes import sft

    cfg, _, prep = prepare(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.resize_token_embeddings(prep.token_extension["vocab_size"])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)
    seq = sft.seq_len(prep.train, cfg.data.max_len)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = runtime.step_indices(len(prep.train), GLOBAL_BATCH, cfg.seed, step)
        b = prep.train.batch(idx, seq, prep.eos_id)
        ids = torch.from_numpy(b["input_ids"]).long()
        return ids, torch.where(torch.from_numpy(b["loss_mask"]), ids, -100)

    def step_fn(step: int) -> float:
        ids, labels = batch(step)
        loss = model(input_ids=ids, labels=labels).loss  # token mean over labels != -100, shifted
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    losses = [step_fn(step) for step in range(warmup)]
    t = time.perf_counter()
    for step in range(warmup, warmup + steps):
        step_fn(step)
    return {"sec_per_step": (time.perf_counter() - t) / steps, "tokens_per_step": GLOBAL_BATCH * seq,
            "first_loss": losses[0], "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--side", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        fn = jax_side if args.side == "jax" else torch_side
        print(json.dumps(fn(args.model_dir, args.steps, args.warmup)))
        return

    from mllm_jax.models.tiny import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(write_tiny_model(Path(tmp) / "bench-qwen2", **MODEL))
        results: dict[str, list[dict]] = {"torch": [], "jax": []}
        for r in range(args.rounds):
            for side in ("torch", "jax"):
                out = subprocess.run([sys.executable, __file__, "--side", side, "--model-dir", model_dir,
                                      "--steps", str(args.steps), "--warmup", str(args.warmup)],
                                     capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu", **_env()})
                if out.returncode:
                    sys.exit(f"{side} side failed:\n{out.stderr[-3000:]}")
                results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1} {side:5s} {1000 * results[side][-1]['sec_per_step']:8.1f} ms/step", flush=True)

    med = {s: statistics.median(x["sec_per_step"] for x in v) for s, v in results.items()}
    j, t = results["jax"][-1], results["torch"][-1]
    print(f"\nQwen2 {MODEL}, batch {GLOBAL_BATCH} x {t['tokens_per_step'] // GLOBAL_BATCH} tokens, fp32, "
          f"{args.steps} steps after {args.warmup} warm-up, median of {args.rounds} rounds")
    print(f"first-step loss on the same batch: jax {j['first_loss']:.4f}  torch {t['first_loss']:.4f}")
    peak = statistics.median(x["peak_flops"] for x in results["jax"])
    print(f"{'side':8s}{'ms/step':>10s}{'tokens/s':>12s}{'MFU':>8s}")
    for s in ("torch", "jax"):
        tokens = results[s][-1]["tokens_per_step"]
        mfu = j["flops_per_token"] * tokens / med[s] / peak
        print(f"{s:8s}{1000 * med[s]:10.1f}{tokens / med[s]:12,.0f}{100 * mfu:7.1f}%")
    print(f"speed-up (tokens/s, jax / torch): {med['torch'] / med['jax']:.2f}x   "
          f"(matmul peak {peak / 1e9:.0f} GFLOP/s, torch threads {t['threads']})")


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}


if __name__ == "__main__":
    main()
