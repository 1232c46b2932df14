"""Every script in benchmarks/ runs, with its smallest arguments: a smoke that keeps them from
rotting, not a timing (speed is measured by running a script by hand: see its docstring)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, trainer_env

SMOKE_ARGS = {
    "beam_search.py": ["--prompts", "2", "--batch", "1", "--beams", "4"],
    "bootstrap.py": ["--workers", "1"],
    "fanout.py": ["--repeats", "1"],
    "nanogpt_cpu.py": ["--rounds", "1", "--steps", "2", "--warmup", "1"],
    "nanogpt_cpu_quality.py": ["--seeds", "1", "--steps", "20"],
    "rl_step.py": ["--prompts", "1", "--rounds", "1"],
    "sft_step.py": ["--rounds", "1", "--steps", "1", "--warmup", "1"],
    "sync.py": ["--repeats", "1", "--files", "5", "--megabytes", "0.1"],
    "tpu_preflight.py": ["--layers", "1", "--only", "nanogpt v6e8"],
}
ON_SSHD = {"bootstrap.py", "fanout.py", "sync.py"}
"""These start sshd hosts of their own on the harness's loopback addresses: with the e2e tests."""


def test_every_benchmark_has_a_smoke():
    assert sorted(SMOKE_ARGS) == sorted(p.name for p in (REPO / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", [pytest.param(s, marks=[pytest.mark.e2e] if s in ON_SSHD else [])
                                    for s in sorted(SMOKE_ARGS)])
def test_benchmark_runs(script: str) -> None:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *SMOKE_ARGS[script]], cwd=REPO,
                         env=trainer_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.strip(), "a benchmark prints what it measured"
