"""`mllm regress`: suites load and validate; a local suite passes, records its baseline, and fails
with exit 1 on a deliberate regression, saying which check and by how much; `--compare` lists
what changed; on two sshd workers a suite reports both workers' versions, the commit, and a run
that crashes as failed (with its error) while the next run still runs. Real `mllm`, real trainer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHAKESPEARE, launcher_env, mllm
from harness.tpu_slice import ZONE, Slice
from launcher import regress


def test_shipped_suites_load_and_validate():
    """Every referenced config and key resolves (through the trainer's loader), no TPU needed."""
    sop = regress.load_suite(regress.suite_path("sop-v6e8", REPO), REPO)
    assert sop.steps[:2] == ["sync", "versions"] and [r.name for r in sop.runs] == ["sft-step-time", "nanogpt-1500"]
    assert [r.config for r in sop.runs] == ["configs/sft/v6e8_step_time.yaml", "configs/nanogpt/v6e8_regression_1500.yaml"]
    nano = sop.runs[1]
    assert [c.name for c in nano.checks] == ["exit_ok", "wandb_url", "eval/loss@1500"] and nano.checks[2].bound == 0.02
    assert sop.baselines == {"nanogpt-1500": {"eval/loss@1500": 1.4672}}  # the seed's observed value
    cpu = regress.load_suite(regress.suite_path("cpu", REPO), REPO)
    assert cpu.tiny_model == "models/tiny-qwen2" and [r.name for r in cpu.runs] == ["nanogpt-cpu", "sft-cpu-smoke"]
    assert cpu.baselines["nanogpt-cpu"]["eval/loss@2000"] == pytest.approx(1.9076)
    for suite in (sop, cpu):
        regress.validate(suite, regress.overrides_by_run(suite, ["nanogpt-1500:train.max_steps=10"]
                                                         if suite is sop else []), REPO)


def test_judgements_say_by_how_much():
    entry = {"exit_code": 0, "error": None}
    metrics = [{"step": 5, "train/loss": 2.5}, {"step": 10, "eval/loss": 2.0},
               {"step": 20, "eval/loss": 1.5, "train/loss": 1.6}]
    summary = {"status": "completed", "step_time_stats": {"median": 0.3}}
    tol = regress.Check("tolerance", metric="eval/loss", step=20, bound=0.02)
    j = regress.judge(tol, entry, summary, metrics, "", 1.4672)
    assert j.status == "fail" and j.delta == pytest.approx(0.0328) and "(+0.0328)" in j.detail
    assert regress.judge(tol, entry, summary, metrics, "", 1.49).status == "pass"
    assert regress.judge(tol, entry, summary, metrics, "", None).status == "new"
    missing = regress.judge(regress.Check("tolerance", metric="eval/loss", step=30, bound=1), entry, summary, metrics,
                            "", 1.0)
    assert missing.status == "fail" and "no value at step 30" in missing.detail
    ratio = regress.Check("max_ratio", summary="step_time_stats.median", bound=1.25)
    assert ratio.name == "summary.step_time_stats.median"
    assert regress.judge(ratio, entry, summary, metrics, "", 0.25).status == "pass"
    slow = regress.judge(ratio, entry, summary, metrics, "", 0.2)
    assert slow.status == "fail" and "1.500 x the baseline 0.2" in slow.detail
    falls = regress.judge(regress.Check("falls", metric="train/loss"), entry, summary, metrics, "", None)
    assert falls.status == "pass" and falls.detail == "2.5000 (step 5) -> 1.6000 (step 20)"
    rises = regress.judge(regress.Check("falls", metric="train/loss"), entry, summary, metrics[::-1], "", None)
    assert rises.status == "fail"
    crashed = regress.judge(regress.Check("exit_ok"), {"exit_code": 0, "error": None}, summary, metrics,
                            "Traceback (most recent call last):\n", None)
    assert crashed.status == "fail" and "a traceback in the log" in crashed.detail


def suite_file(directory: Path, runs: str) -> Path:
    path = directory / "mini.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(runs)
    return path


NANO = """  - run: nano
    recipe: nanogpt
    config: configs/nanogpt/cpu_smoke.yaml
    set: [train.max_steps=30, train.eval_every=30, sample.max_new_tokens=0, data.path={data}]
    checks:
      - exit_ok
      - {{metric: eval/loss, step: 30, tolerance: 0.05}}
      - {{metric: train/loss, falls: true}}
"""


@pytest.fixture()
def repo(tmp_path):
    clone = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    return clone


def test_local_suite_records_a_baseline_and_fails_a_regression_by_how_much(tmp_path, repo):
    # In the repository's suites dir: --record writes only its configs/regress/baselines/ (never where a report says).
    suite = suite_file(repo / "configs" / "regress", "steps:\n  - versions\n" + NANO.format(data=SHAKESPEARE))
    env = launcher_env(tmp_path, "http://127.0.0.1:9")
    run = lambda *a: mllm(*a, cwd=repo, env=env, timeout=300)  # noqa: E731

    first = run("regress", str(suite), "--local")
    assert first.returncode == 0, first.stdout + first.stderr  # no baseline yet: "new", not a failure
    (report_a,) = sorted((repo / "reports").glob("mini-*-local.json"))
    a = json.loads(report_a.read_text())
    assert a["passed"] and a["commit"] == subprocess.check_output(["git", "-C", repo, "rev-parse", "HEAD"], text=True).strip()
    assert a["steps"][0]["command"] == "mllm versions --local" and a["steps"][0]["exit_code"] == 0
    assert a["environment"]["workers"]["0"]["backend"] == "cpu"
    (nano,) = a["runs"]
    assert nano["exit_code"] == 0 and [c["status"] for c in nano["checks"]] == ["pass", "new", "pass"]
    assert (repo / nano["summary_path"]).is_file()

    recorded = run("regress", "--record", str(report_a))
    assert recorded.returncode == 0, recorded.stderr
    observed = nano["checks"][1]["observed"]
    assert f"nano eval/loss@30: none -> {observed:.6g}" in recorded.stdout
    baseline = repo / "configs" / "regress" / "baselines" / "mini.yaml"
    assert f"wrote {baseline}" in recorded.stdout and "eval/loss@30" in baseline.read_text()

    # A learning rate 100x too small: the eval loss misses its baseline, exit 1, the report says by how much.
    slow = run("regress", str(suite), "--local", "--set", "nano:train.learning_rate=1e-5")
    assert slow.returncode == 1, slow.stdout + slow.stderr
    report_b = max((repo / "reports").glob("mini-*-local.json"), key=lambda p: p.stat().st_mtime)
    b = json.loads(report_b.read_text())
    check = b["runs"][0]["checks"][1]
    assert not b["passed"] and check["status"] == "fail" and check["delta"] > 0.05, check
    md = report_b.with_suffix(".md").read_text()
    assert "FAILED" in md and f"| eval/loss@30 | {observed:.6g} ± 0.05 | observed" in md and "| fail |" in md
    assert "--set train.learning_rate=1e-5" in b["runs"][0]["command"]

    compared = run("regress", "--compare", str(report_a), str(report_b))
    assert compared.returncode == 0
    assert f"nano eval/loss@30: {observed:.6g} -> {check['observed']:.6g} ({check['delta']:+.4g}), new -> fail" \
        in compared.stdout, compared.stdout
    assert run("regress", "--compare", str(report_a), str(report_a)).stdout.strip() == "no changes"


@pytest.mark.e2e
def test_suite_on_two_workers_reports_versions_the_commit_and_a_crashed_run(tmp_path, hosts, repo, bucket):
    laptop_only = tmp_path / "input.txt"  # the workers' /tmp is their own: there the file is missing
    laptop_only.write_text(SHAKESPEARE.read_text())
    runs = "".join(f"""  - run: {name}
    recipe: nanogpt
    config: configs/nanogpt/cpu_smoke.yaml
    set: [train.max_steps=10, train.log_every=2, sample.max_new_tokens=0, data.path={data}, train.checkpoint_dir={bucket}/{name}]
    checks: [exit_ok, {{metric: train/loss, falls: true}}]
""" for name, data in (("crash", laptop_only), ("fine", bucket / "input.txt")))
    suite = suite_file(tmp_path / "suites", "steps:\n  - sync\n  - versions\n" + runs)
    with Slice(hosts).api as api:
        env = launcher_env(tmp_path, api.endpoint)
        run = lambda *a: mllm(*a, cwd=repo, env=env, timeout=300)  # noqa: E731
        assert run("vm", "create", "pair", "--zone", ZONE, "--type", "v4-16").returncode == 0
        assert run("bootstrap", "--python", sys.executable).returncode == 0
        out = run("regress", str(suite))
        assert out.returncode == 1, out.stdout + out.stderr
        (path,) = (repo / "reports").glob("mini-*-pair.json")
        report = json.loads(path.read_text())
        head = subprocess.check_output(["git", "-C", repo, "rev-parse", "HEAD"], text=True).strip()
        assert report["commit"] == head and report["target"]["workers"] == 2 and report["target"]["zone"] == ZONE
        assert [(s["command"], s["exit_code"]) for s in report["steps"]] == [("mllm sync", 0), ("mllm versions", 0)]
        workers = report["environment"]["workers"]
        assert sorted(workers) == ["0", "1"] and all(w["backend"] == "cpu" and w["jax"] for w in workers.values())
        crash, fine = report["runs"]
        # The data only on the laptop: the trainer refuses it on the workers (exit 2, its one line, no summary).
        assert not crash["passed"] and crash["exit_code"] == 2, crash
        assert crash["error"] == f"w0: data.path: file not found: {laptop_only}", crash
        assert crash["checks"][0]["status"] == "fail" and crash["error"] in crash["checks"][0]["detail"]
        assert fine["passed"] and fine["exit_code"] == 0 and (repo / fine["summary_path"]).is_file()
        md = path.with_suffix(".md").read_text()
        assert f"- **Commit**: `{head}`" in md and "TPU VM: `pair` (zone `us-east1-d`" in md and "- worker 1: " in md
        assert "### crash: FAIL" in md and "### fine: pass" in md
        assert run("vm", "delete", "--yes").returncode == 0
