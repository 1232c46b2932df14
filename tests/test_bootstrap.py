"""End-to-end on bare workers: a spot 2-worker VM through a queued resource that waits for
capacity, `mllm bootstrap` installing the synced repo's own pyproject.toml into a fresh venv with
uv (no `--python`; one worker's python3 has no venv/ensurepip), a no-op second bootstrap, a
pyproject change that `mllm launch` installs before it starts SFT on both workers, versions
next to the laptop's, fetch-summary, and `vm delete NAME` leaving nothing behind. All through the
real `mllm` CLI, the Cloud TPU REST server and sshd workers.

The workers install with `--offline` from uv's cache (~/.cache/uv, which each host sees through
its /root overlay), filled once by the same pins on this machine: the install command is the
real one, only the wheels come from disk instead of the network.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from conftest import (INDUSTRIAL_INDEX, INDUSTRIAL_ITEMS, INDUSTRIAL_TEST, INDUSTRIAL_VALID, REPO, SFT_SMOKE,
                      launcher_env, mllm)
from harness.tpu_slice import ZONE, Slice
from launcher import remote

pytestmark = pytest.mark.e2e  # real sshd workers

UV = str(Path(sys.executable).with_name("uv"))
VENV = "/root/mllm-venv"


@pytest.fixture(scope="module")
def uv_cache() -> None:
    """uv's cache holds every wheel the workers' install needs (a no-op when it already does)."""
    venv = tempfile.mkdtemp(prefix="mllm-uv-warm-")
    try:
        subprocess.run([UV, "venv", "-q", "--python", sys.executable, venv], check=True)
        subprocess.run([UV, "pip", "install", "-q", "--python", f"{venv}/bin/python", "-e", str(REPO),
                        *remote.laptop_pins(None)], check=True, timeout=900)
    finally:
        shutil.rmtree(venv, ignore_errors=True)


@pytest.fixture()
def bucket(tiny_qwen2):
    """Storage every worker sees (not under a private /root or /tmp): the tiny model, the data,
    and the multi-worker checkpoints."""
    path = Path(tempfile.mkdtemp(prefix="mllm-bucket-", dir="/srv"))
    try:
        shutil.copytree(tiny_qwen2, path / "tiny-qwen2")
        for f in (INDUSTRIAL_VALID, INDUSTRIAL_TEST, INDUSTRIAL_INDEX, INDUSTRIAL_ITEMS):
            shutil.copy(f, path / f.name)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def repo(tmp_path):
    clone = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    for k, v in (("user.email", "t@example.com"), ("user.name", "t")):
        subprocess.run(["git", "-C", str(clone), "config", k, v], check=True)
    return clone


def worker_text(stdout: str) -> str:
    """One worker's `mllm exec` output without its `[wK] ` prefixes."""
    return "\n".join(line.split(" ", 1)[1] if " " in line else "" for line in stdout.splitlines())


def sft_sets(bucket: Path) -> list[str]:
    sets = {"base_model": bucket / "tiny-qwen2", "data.train_file": bucket / INDUSTRIAL_VALID.name,
            "data.eval_file": bucket / INDUSTRIAL_TEST.name, "data.test_file": bucket / INDUSTRIAL_TEST.name,
            "data.sid_index_path": bucket / INDUSTRIAL_INDEX.name, "data.item_meta_path": bucket / INDUSTRIAL_ITEMS.name,
            "train.checkpoint_dir": bucket / "ckpt", "train.max_steps": 20, "train.eval_every": 20,
            "train.checkpoint_every": 20}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def test_queued_vm_bootstraps_from_pyproject_and_runs_sft(tmp_path, hosts, repo, bucket, uv_cache):
    with Slice(hosts, qr_wait=1.5).api as api:
        env = launcher_env(tmp_path, api.endpoint)
        run = lambda *a: mllm(*a, cwd=repo, env=env, timeout=600)  # noqa: E731

        created = run("vm", "create", "pair", "--queued", "--spot", "--zone", ZONE, "--type", "v4-16", "--poll", "0.2")
        assert created.returncode == 0, created.stderr
        seen = [line.split(": ")[1].split()[0] for line in created.stderr.splitlines() if line.startswith("queued resource pair")]
        assert seen[-1] == "ACTIVE" and "WAITING_FOR_RESOURCES" in seen, created.stderr
        assert "created pair (v4-16" in created.stdout and "spot" in created.stdout
        (qr,) = api.queued_resources.values()
        assert "spot" in qr and api.node("pair")["state"] == "READY"

        # Worker 1 is a bare image: its python3 has neither venv nor ensurepip.
        stdlib = sysconfig.get_paths()["stdlib"]
        for module in ("venv", "ensurepip"):
            assert run("exec", "--worker", "1", "--", "mount", "-t", "tmpfs", "bare", f"{stdlib}/{module}").returncode == 0
        assert run("exec", "--worker", "1", "--", "python3", "-m", "venv", "/root/v").returncode != 0

        first = run("bootstrap", "--offline")
        assert first.returncode == 0, first.stdout + first.stderr
        for w in ("w0", "w1"):
            assert f"[{w}] ready: {VENV}/bin/python (installed in" in first.stdout, first.stdout
        assert f"pip install --quiet --python {VENV}/bin/python --offline" in first.stdout
        record = json.loads(worker_text(run("exec", "--worker", "1", "--", "cat", f"{VENV}/mllm-install.json").stdout))
        laptop = remote.laptop_versions()
        assert {f"jax=={laptop['jax']}", f"jaxlib=={laptop['jaxlib']}", f"flax=={laptop['flax']}"} <= set(record["spec"]["pins"])
        assert record["options"]["offline"] is True and record["spec"]["target"] == "/root/mllm-jax"

        again = run("bootstrap")  # where packages come from is not part of what is installed: nothing to do
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.count("up to date, checked in") == 2 and "pip install" not in again.stdout, again.stdout

        versions = json.loads(run("versions", "--json").stdout)
        assert versions["mismatches"] == [] and versions["laptop"]["jax"] == versions["workers"]["1"]["jax"]
        assert set(versions["workers"]) == {"0", "1"} and versions["workers"]["0"]["backend"] == "cpu"

        # A pyproject change reaches the workers' venvs at the next launch, before the job starts.
        pyproject = repo / "pyproject.toml"
        pyproject.write_text(pyproject.read_text().replace('[project.scripts]\n', '[project.scripts]\nmllm-e2e-marker = "launcher.cli:run"\n'))
        subprocess.run(["git", "-C", str(repo), "commit", "-qam", "a new console script"], check=True)
        launched = run("launch", "sft", "--config", str(SFT_SMOKE.relative_to(REPO)), *sft_sets(bucket), "--follow")
        assert launched.returncode == 0, launched.stdout + launched.stderr
        for w in ("w0", "w1"):
            assert f"[{w}] environment updated in" in launched.stdout and "s: pyproject.toml changed" in launched.stdout
        assert "[w0] step 20/20" in launched.stdout
        assert run("exec", "--", "test", "-x", f"{VENV}/bin/mllm-e2e-marker").returncode == 0

        fetched = run("fetch-summary")
        assert fetched.returncode == 0, fetched.stderr
        run_id = fetched.stdout.split(":")[0]
        summary = json.loads((repo / "runs" / run_id / "run_summary.json").read_text())
        assert summary["status"] == "completed" and summary["process_count"] == 2 and summary["final_step"] == 20
        assert summary["recipe"] == "sft" and summary["versions"]["jax"] == versions["laptop"]["jax"]

        deleted = run("vm", "delete", "pair", "--yes")
        assert deleted.returncode == 0, deleted.stderr
        assert "queued resource pair" in deleted.stdout and not api.nodes and not api.queued_resources


@pytest.fixture()
def wheelhouse():
    """A wheel directory every worker sees, holding uv's wheel for this machine as PyPI ships it."""
    path = Path(tempfile.mkdtemp(prefix="mllm-wheels-", dir="/srv"))
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        f"uv=={remote.installed_version('uv')}", "-d", str(path)], check=True, timeout=600)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_uv_from_a_wheel_drifted_and_mixed_jax_versions(tmp_path, hosts, repo, uv_cache, wheelhouse):
    """A worker without uv gets the laptop's uv from a --find-links wheel; a package
    pip-installed over the pins is healed by bootstrap; an interpreter given with --python whose
    jax differs from worker 0's makes launch refuse, before anything starts."""
    with Slice(hosts).api as api:
        env = launcher_env(tmp_path, api.endpoint)
        run = lambda *a: mllm(*a, cwd=repo, env=env, timeout=600)  # noqa: E731
        assert run("vm", "create", "mixed", "--zone", ZONE, "--type", "v4-16").returncode == 0
        # Every uv that python3 on worker 1 can find (pyenv's python3 puts its own bin/ on PATH).
        find = "python3 -c 'import shutil; print(shutil.which(\"uv\") or \"\")'"
        hide = f'for i in 1 2 3 4 5 6 7 8; do p=$({find}); [ -z "$p" ] && exit 0; mount --bind /dev/null "$p" || exit 1; done; exit 1'
        assert run("exec", "--worker", "1", "--", "sh", "-c", hide).returncode == 0
        assert run("exec", "--worker", "1", "--", "sh", "-c", find).stdout.strip() == "[w1]"  # no uv there now
        booted = run("bootstrap", "--offline", "--find-links", str(wheelhouse))
        assert booted.returncode == 0, booted.stdout + booted.stderr
        assert "[w1] + /root/.mllm/bin/uv pip install" in booted.stdout and "[w0] + /root/.mllm" not in booted.stdout
        found = run("exec", "--worker", "1", "--", "/root/.mllm/bin/uv", "--version")
        assert found.stdout.split()[:3] == ["[w1]", "uv", remote.installed_version("uv")]
        site = f"{VENV}/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
        jax_version = remote.laptop_versions()["jax"]
        metadata = f"{site}/jax-{jax_version}.dist-info/METADATA"
        assert run("exec", "--worker", "0", "--", "sed", "-i", f"s/^Version: {jax_version}$/Version: 0.0.1/", metadata).returncode == 0
        drifted = json.loads(run("versions", "--json").stdout)["mismatches"]
        assert drifted == [{"worker": 0, "field": "jax", "laptop": jax_version, "worker_value": "0.0.1"}]
        table = run("versions")
        assert "0.0.1 *" in table.stdout and f"w0 jax 0.0.1 (laptop {jax_version})" in table.stdout
        healed = run("bootstrap", "--worker", "0", "--offline")
        assert healed.returncode == 0 and "installed versions differ from the pins: jax 0.0.1" in healed.stdout, healed.stdout
        assert json.loads(run("versions", "--json").stdout)["mismatches"] == []

        # Worker 1 on an interpreter of its own whose jax says another version.
        fake = "/root/other-env"
        made = run("exec", "--worker", "1", "--", "/root/.mllm/bin/uv", "venv", "-q", "--system-site-packages",
                   "--python", sys.executable, fake)
        assert made.returncode == 0, made.stdout
        dist = f"{fake}/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages/jax-0.0.2.dist-info"
        assert run("exec", "--worker", "1", "--", "mkdir", dist).returncode == 0
        assert run("exec", "--worker", "1", "--", "sh", "-c", f"printf 'Name: jax\\nVersion: 0.0.2\\n' > {dist}/METADATA").returncode == 0
        assert run("bootstrap", "--worker", "1", "--python", f"{fake}/bin/python").returncode == 0
        runs = lambda: sorted(run("exec", "--", "sh", "-c", "ls ~/mllm-jax/runs 2>/dev/null | wc -l").stdout.splitlines())  # noqa: E731
        before = runs()
        refused = run("launch", "nanogpt", "--config", "configs/nanogpt/cpu_smoke.yaml")
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert refused.stderr.strip() == (f"error: w1 has jax 0.0.2 but w0 has {jax_version}: mixed versions hang "
                                          "jax.distributed; run `mllm bootstrap`")
        assert runs() == before  # nothing started
        assert run("vm", "delete", "mixed", "--yes").returncode == 0
