"""nanoGPT CPU recipe: our JAX train step vs PyTorch nanoGPT, measured side by side in one run.

    python benchmarks/nanogpt_cpu.py [--rounds 3] [--steps 50] [--warmup 10]

Each side runs in its own fresh process (alternating rounds, so drift in the machine's speed
hits both alike) on configs/nanogpt/cpu.yaml's model and batch. The JAX side is the trainer's
own NanoGPTTask step with its start-up settings; the PyTorch side is karpathy/nanoGPT's model
and AdamW as its train.py runs them on a CPU. Prints ms/step, tokens/s, MFU against a matmul
peak measured in the same run, and the ratio. Needs `pip install torch==2.13.0` for the
PyTorch side (without it only the JAX side is measured).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "nanogpt" / "cpu.yaml"
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def jax_side(steps: int, warmup: int) -> dict:
    from mllm_jax import runtime
    from mllm_jax.config import load_config
    from mllm_jax.recipes.nanogpt import Config, NanoGPTTask

    runtime.tune_host_allocator()
    import jax

    cfg = load_config(Config, CONFIG, [f"data.path={DATA}"] if DATA.is_file() else [])
    task = NanoGPTTask(cfg, runtime.make_mesh(cfg.jax.mesh_shape))
    state = task.state
    for step in range(warmup):
        state, metrics = task.train_step(state, step)
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for step in range(warmup, warmup + steps):  # async dispatch, as in the trainer's loop
        state, metrics = task.train_step(state, step)
    jax.block_until_ready(metrics)
    sec = (time.perf_counter() - t) / steps
    return {"sec_per_step": sec, "tokens_per_step": task.tokens_per_step, "flops_per_token": task.flops_per_token,
            "peak_flops": runtime.measure_matmul_flops(), "loss": float(metrics["loss"])}


def torch_nanogpt(cfg, vocab_size: int, seed: int):  # type: ignore[no-untyped-def]
    """karpathy/nanoGPT's model.py GPT and train.py's AdamW, at cfg's sizes (fp32, no compile)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    m, t = cfg.model, cfg.train
    V, C = vocab_size, m.n_embd

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C, bias=m.bias), nn.LayerNorm(C, bias=m.bias)
            self.c_attn, self.attn_proj = nn.Linear(C, 3 * C, bias=m.bias), nn.Linear(C, C, bias=m.bias)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C, bias=m.bias), nn.Linear(4 * C, C, bias=m.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, T, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (a.view(B, T, m.n_head, C // m.n_head).transpose(1, 2) for a in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
            x = x + self.attn_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(m.block_size, C)
            self.h = nn.ModuleList(Block() for _ in range(m.n_layer))
            self.ln_f = nn.LayerNorm(C, bias=m.bias)
            self.lm_head = nn.Linear(C, V, bias=False)
            self.wte.weight = self.lm_head.weight
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    std = 0.02 / math.sqrt(2 * m.n_layer) if name.endswith("proj.weight") else 0.02
                    nn.init.normal_(p, 0.0, std)

        def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, V), targets.reshape(-1))

    torch.manual_seed(seed)
    model = GPT()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=t.learning_rate, betas=(t.beta1, t.beta2))

    def step(x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # nanoGPT reads the loss every iteration (log_interval=1 on CPU)

    return model, step


def torch_side(steps: int, warmup: int) -> dict:
    import torch

    from mllm_jax.config import load_config
    from mllm_jax.recipes.nanogpt import Config

    cfg = load_config(Config, CONFIG, [f"data.path={DATA}"] if DATA.is_file() else [])
    B, T, V = cfg.train.global_batch_size, cfg.model.block_size, 65
    _, step = torch_nanogpt(cfg, V, seed=0)
    batches = [(torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))) for _ in range(8)]
    for i in range(warmup):
        step(*batches[i % 8], cfg.train.learning_rate)
    start = time.perf_counter()
    for i in range(steps):
        loss = step(*batches[i % 8], cfg.train.learning_rate)
    return {"sec_per_step": (time.perf_counter() - start) / steps, "tokens_per_step": B * T,
            "threads": torch.get_num_threads(), "loss": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--side", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        fn = jax_side if args.side == "jax" else torch_side
        print(json.dumps(fn(args.steps, args.warmup)))
        return

    try:
        import torch  # noqa: F401

        sides = ["torch", "jax"]
    except ImportError:
        print("torch is not installed: measuring the JAX side only (pip install torch==2.13.0)")
        sides = ["jax"]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.rounds):
        for side in sides:
            cmd = [sys.executable, __file__, "--side", side, "--steps", str(args.steps), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {side:5s}: {1000 * runs[side][-1]['sec_per_step']:.1f} ms/step", flush=True)

    med = {s: statistics.median(x["sec_per_step"] for x in runs[s]) for s in sides}
    j = runs["jax"][-1]
    peak = statistics.median(x["peak_flops"] for x in runs["jax"])
    print(f"\nnanoGPT CPU recipe ({CONFIG.relative_to(REPO)}), {args.steps} steps after {args.warmup} warm-up, "
          f"median of {args.rounds} rounds")
    print(f"{'':8s}{'ms/step':>10s}{'tokens/s':>12s}{'MFU':>8s}")
    for s in sides:
        mfu = j["flops_per_token"] * j["tokens_per_step"] / med[s] / peak
        print(f"{s:8s}{1000 * med[s]:10.1f}{j['tokens_per_step'] / med[s]:12,.0f}{100 * mfu:7.1f}%")
    print(f"matmul peak (f32, 1024^3, measured): {peak / 1e9:.0f} GFLOP/s")
    if "torch" in med:
        print(f"speed-up jax/torch (tokens/s): {med['torch'] / med['jax']:.2f}x (goal >= 1.5x)")


if __name__ == "__main__":
    main()
