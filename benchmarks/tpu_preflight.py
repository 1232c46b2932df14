"""The SOP's configs compiled for a v6e-8 by libtpu on this machine, before and after the TPU
work of issue 12 (chunked cross entropy, scanned decoder layers), in one table: per-chip HBM,
compile seconds, XLA's estimated step time and MFU (the cost model's, not a measurement).

    python benchmarks/tpu_preflight.py [--type v6e-8] [--layers 28] [--only NAME ...]

The sft model is Qwen2.5-1.5B-Instruct's shapes (config.json values, no weights: nothing is
downloaded); its SID index is taken as absent, so the vocabulary is config.json's 151,936.
"before" turns the new knobs off (train.loss_chunk_size null, train.scan_layers false); the
Adam moments, replicated on every chip before this issue, are sharded like their params in
both rows (that fix has no switch). nanoGPT's programs did not change: one row each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
VARIANTS = [
    ("sft v6e8_step_time", "before", "sft", "configs/sft/v6e8_step_time.yaml",
     ["train.loss_chunk_size=null", "train.scan_layers=false"]),
    ("sft v6e8_step_time", "after", "sft", "configs/sft/v6e8_step_time.yaml", []),
    ("nanogpt v6e8", "same", "nanogpt", "configs/nanogpt/v6e8.yaml", []),
    ("nanogpt v6e8_regression_1500", "same", "nanogpt", "configs/nanogpt/v6e8_regression_1500.yaml", []),
]


def preflight(recipe: str, config: str, sets: list[str], accelerator_type: str) -> dict:
    argv = [sys.executable, "-m", "mllm_jax", "preflight", recipe, "--config", str(REPO / config),
            "--type", accelerator_type, "--json", "--no-cache"]
    for item in sets:
        argv += ["--set", item]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    if out.returncode not in (0, 1):
        sys.exit(f"preflight failed: {' '.join(argv)}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--type", default="v6e-8")
    parser.add_argument("--layers", type=int, default=28, help="decoder layers of the sft model (28 = full size)")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=sorted({v[0] for v in VARIANTS}),
                        help="only these configs (the sft ones compile for minutes on a CPU)")
    args = parser.parse_args()
    from mllm_jax.models.tiny import write_shapes_model

    model = write_shapes_model(Path(tempfile.mkdtemp(prefix="qwen2.5-1.5b-")), num_hidden_layers=args.layers)
    common = {"sft": [f"base_model={model}", "data.sid_index_path=workdir/not-here.json"],
              "nanogpt": [f"data.path={SHAKESPEARE}"]}
    rows = []
    for name, variant, recipe, config, sets in VARIANTS:
        if args.only and name not in args.only:
            continue
        r = preflight(recipe, config, common[recipe] + sets, args.type)
        for p in r["programs"]:
            e = p.get("estimate") or {}
            rows.append((name, variant, p["name"], p["needed"] / 2**30, 100 * p.get("share", float("nan")),
                         p["compile_sec"], 1e3 * e["seconds"] if e else None, 100 * e["mfu"] if "mfu" in e else None))
        print(f"# {name} ({variant}): {r['facts']}", flush=True)
    print(f"\n{args.type}, jax {r['jax']}, libtpu {r['libtpu']}; estimates are XLA's cost model, not measurements\n")
    print("| config | variant | program | HBM GiB/chip | % of HBM | compile s | est. ms | est. MFU % |")
    print("|---|---|---|---|---|---|---|---|")
    for name, variant, prog, gib, share, sec, ms, mfu in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"| {name} | {variant} | {prog} | {gib:.2f} | {share:.1f} | {sec:.1f} | {fmt(ms, '.1f')} | {fmt(mfu, '.0f')} |")


if __name__ == "__main__":
    main()
