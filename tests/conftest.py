"""Shared test helpers: run the real trainer CLI in subprocesses, on the shared data."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
SMOKE = REPO / "configs" / "nanogpt" / "cpu_smoke.yaml"
SFT_SMOKE = REPO / "configs" / "sft" / "cpu_smoke.yaml"
SFT_FOR_RL = REPO / "configs" / "sft" / "cpu_smoke_for_rl.yaml"
RL_SMOKE = REPO / "configs" / "rl" / "cpu_smoke.yaml"
AMAZON = SHARED_DATA / "MiniOneRec" / "data" / "Amazon"
INDUSTRIAL_VALID = AMAZON / "valid" / "Industrial_and_Scientific_5_2016-10-2018-11.csv"
INDUSTRIAL_TEST = AMAZON / "test" / "Industrial_and_Scientific_5_2016-10-2018-11.csv"
INDUSTRIAL_INDEX = AMAZON / "index" / "Industrial_and_Scientific.index.json"
INDUSTRIAL_ITEMS = AMAZON / "index" / "Industrial_and_Scientific.item.json"


def trainer_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """A clean environment for a trainer process with `devices` virtual CPU devices."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLLM_", "WANDB_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    env.update(extra)
    return env


def trainer_cmd(*args: str, recipe: str = "nanogpt") -> list[str]:
    return [sys.executable, "-m", "mllm_jax", "train", recipe, *args]


def run_trainer(*args: str, cwd: Path, devices: int = 1, env: dict[str, str] | None = None,
                timeout: float = 300, recipe: str = "nanogpt") -> subprocess.CompletedProcess:
    return subprocess.run(trainer_cmd(*args, recipe=recipe), cwd=cwd, env=env or trainer_env(devices),
                          capture_output=True, text=True, timeout=timeout)


def run_hosts(*args: str, cwd: Path, recipe: str = "nanogpt", processes: int = 2, devices: int = 4,
              timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """The trainer as `processes` jax.distributed processes of `devices` CPU devices each, the
    way the launcher starts one per TPU worker; waits for all of them."""
    port = free_port()
    procs = [
        subprocess.Popen(trainer_cmd(*args, recipe=recipe), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=trainer_env(devices, MLLM_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                    MLLM_NUM_PROCESSES=str(processes), MLLM_PROCESS_ID=str(pid)))
        for pid in range(processes)
    ]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs)]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path, name: str = "train/loss") -> dict[int, float]:
    return {e["step"]: e[name] for e in read_metrics(run_dir) if name in e}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The suite runs in two processes (pytest-xdist, `-n 2 --dist loadgroup` in pyproject.toml).
    The tests on sshd workers go to one of them, one at a time: they share the loopback
    addresses (a preempted host takes its address again) and the harness's timeouts; the other
    tests spread over both.

    Each of those tests gets one rerun (pytest-rerunfailures), and the rerun is reported: a
    2-process CPU job starved by the other process can miss gloo's fixed 30 s collective
    timeout and abort (exit 134), seen in 2 of 4 CI runs. A real bug fails its rerun too."""
    for item in items:
        if item.get_closest_marker("e2e") or "hosts" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("sshd"))
            item.add_marker(pytest.mark.flaky(reruns=1))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 in HF format, written by the documented command."""
    out = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    subprocess.run([sys.executable, "-m", "mllm_jax", "tiny-model", str(out)], check=True, env=trainer_env(),
                   capture_output=True, timeout=120)
    return out


def sft_args(model_dir: Path, *extra: str, config: Path = SFT_SMOKE) -> list[str]:
    """CLI args for the SFT smoke config (or `config`) on `model_dir`, with absolute data paths."""
    return _config_args(config, model_dir, {"data.eval_file": INDUSTRIAL_TEST}, extra)


def rl_args(model_dir: Path, *extra: str) -> list[str]:
    """CLI args for the RL smoke config on `model_dir` (an SFT export), with absolute data paths."""
    return _config_args(RL_SMOKE, model_dir, {}, extra)


def _config_args(config: Path, model_dir: Path, sets: dict[str, Path], extra: tuple[str, ...]) -> list[str]:
    sets = {"base_model": model_dir, "data.train_file": INDUSTRIAL_VALID, "data.test_file": INDUSTRIAL_TEST,
            "data.sid_index_path": INDUSTRIAL_INDEX, "data.item_meta_path": INDUSTRIAL_ITEMS, **sets}
    args = ["--config", str(config)]
    for item in [f"{key}={value}" for key, value in sets.items()] + list(extra):
        args += ["--set", item]
    return args


@pytest.fixture(scope="session")
def shakespeare() -> str:
    assert SHAKESPEARE.is_file(), f"shared data missing: {SHAKESPEARE}"
    return str(SHAKESPEARE)


@pytest.fixture()
def bucket():
    """A directory every sshd host sees (only /root, /tmp, /run... are private) and a
    preemption does not take: a stand-in for shared storage, holding Tiny Shakespeare (copied:
    the shared data dir may itself sit under a private /tmp) and multi-host checkpoints."""
    path = Path(tempfile.mkdtemp(prefix="mllm-bucket-", dir="/srv"))
    try:
        shutil.copy(SHAKESPEARE, path / "input.txt")
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def gcs():
    """A GCS-protocol server on loopback (tests/harness/gcs.py) with one empty bucket."""
    from harness.gcs import GcsServer

    with GcsServer() as server:
        yield server


@pytest.fixture(scope="module")
def hosts():
    """Two sshd "workers" (tests/harness/sshd.py), shared by the tests of one module."""
    from harness.sshd import SshCluster

    cluster = SshCluster(2).start()
    yield cluster
    cluster.stop()


ACCOUNT = "tester@example.com"
"""The account whose OS Login profile the tests' launcher imports its key into."""


def launcher_env(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    """Environment for `mllm` against a local Cloud TPU API, with its own config dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLLM_", "CLOUDSDK_"))}
    # Launches skip preflight (tests/test_preflight.py runs it): compiling each test's config for
    # its TPU type would add minutes and prove nothing more.
    env.update(MLLM_TPU_API_ENDPOINT=endpoint, MLLM_COMPUTE_API_ENDPOINT=endpoint, MLLM_OSLOGIN_API_ENDPOINT=endpoint,
               CLOUDSDK_CORE_ACCOUNT=ACCOUNT, MLLM_PROJECT="test-project", XDG_CONFIG_HOME=str(tmp_path / "config"),
               COLUMNS="200", PYTHONUNBUFFERED="1", MLLM_NO_PREFLIGHT="1")
    env.update(extra)
    return env


def mllm(*args: str, cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real `mllm` console script."""
    return subprocess.run([MLLM, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


MLLM = str(Path(sys.executable).with_name("mllm"))
