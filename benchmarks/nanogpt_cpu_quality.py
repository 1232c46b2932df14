"""Does our nanoGPT CPU recipe learn as well as PyTorch nanoGPT? Final val loss, same seeds.

    python benchmarks/nanogpt_cpu_quality.py [--seeds 1337 1 2] [--steps 2000]

Trains configs/nanogpt/cpu.yaml with the real trainer (`mllm train`) and with karpathy's
PyTorch nanoGPT (model, AdamW, get_lr and get_batch as in its train.py) for each seed, and
scores both on the same held-out batches (the trainer's eval set for that seed). One run's
20-batch estimate varies by about +-0.01 and seeds by about +-0.01, so compare the means.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from nanogpt_cpu import CONFIG, DATA, REPO, torch_nanogpt


def torch_run(seed: int, steps: int) -> float:
    import torch

    from mllm_jax import optim
    from mllm_jax.config import load_config
    from mllm_jax.data.char import CharDataset
    from mllm_jax.recipes.nanogpt import Config

    cfg = load_config(Config, CONFIG, [f"data.path={DATA}", f"seed={seed}", f"train.max_steps={steps}"])
    t, B = cfg.train, cfg.train.global_batch_size
    data = CharDataset(cfg.data.path, cfg.model.block_size)
    model, step = torch_nanogpt(cfg, data.vocab_size, seed)
    lr = optim.warmup_cosine(t.learning_rate, t.min_lr, t.warmup_steps, t.lr_decay_steps or t.max_steps)
    train = torch.from_numpy(data.splits["train"].astype("int64"))
    T = cfg.model.block_size
    for it in range(steps):
        ix = torch.randint(len(train) - T, (B,))  # nanoGPT's get_batch
        x = torch.stack([train[i:i + T] for i in ix])
        y = torch.stack([train[i + 1:i + 1 + T] for i in ix])
        step(x, y, float(lr(it)))
    model.eval()
    with torch.no_grad():
        losses = [model(*(torch.from_numpy(a.astype("int64")) for a in
                          data.batch("val", seed, i, B, slice(0, B)).values())).item()
                  for i in range(t.eval_iters)]
    return sum(losses) / len(losses)


def jax_run(seed: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "mllm_jax", "train", "nanogpt", "--config", str(CONFIG),
                        "--set", f"data.path={DATA}", "--set", f"seed={seed}", "--set", f"train.max_steps={steps}",
                        "--set", "wandb.mode=disabled", "--set", "sample.max_new_tokens=0",
                        "--set", f"output_dir={tmp}/run"], check=True, capture_output=True, cwd=REPO)
        return json.loads(Path(tmp, "run", "run_summary.json").read_text())["eval_losses"][-1]["loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2])
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        rows.append((seed, jax_run(seed, args.steps), torch_run(seed, args.steps)))
        print(f"seed {seed:5d}: mllm-jax {rows[-1][1]:.4f}   pytorch nanoGPT {rows[-1][2]:.4f}", flush=True)
    jm, tm = statistics.mean(r[1] for r in rows), statistics.mean(r[2] for r in rows)
    print(f"mean val loss at step {args.steps}: mllm-jax {jm:.4f}, pytorch {tm:.4f}, difference {jm - tm:+.4f}")


if __name__ == "__main__":
    main()
