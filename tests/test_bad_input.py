"""Bad input, table-driven: every case below exits 2 with exactly one `error: ` line on stderr,
no traceback, and creates, changes or removes no file or directory (no run dir under runs/, no
repointed runs/latest; on the workers too).

Each row is (id, argv, setup). argv[0] says how it runs:
- "train": the trainer in this process, `mllm_jax.train.main(argv)` (JAX is imported once);
- "python": `python -m mllm_jax ...` in a subprocess (a few representative trainer cases);
- "mllm": the real `mllm` console script in a subprocess.
`setup(tmp, request)` writes the row's inputs into the test's directory (its cwd) before the
snapshot is taken. The rows on sshd workers are in test_bad_input_on_workers (e2e).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from conftest import (INDUSTRIAL_INDEX, MLLM, SHAKESPEARE, SMOKE, free_port, launcher_env, rl_args, sft_args,
                      trainer_env)

Setup = Callable[[Path, pytest.FixtureRequest], None]
BINARY = bytes(range(256)) * 8  # not UTF-8, has NUL bytes
GOOD_ENV = b"WANDB_API_KEY=abc\n"


def nano(*sets: str, config: Path = SMOKE, extra: tuple[str, ...] = ()) -> list[str]:
    """Trainer argv for nanoGPT's smoke config (2 steps on Tiny Shakespeare) plus `sets`."""
    argv = ["train", "nanogpt", "--config", str(config), *extra]
    for item in ("train.max_steps=2", "sample.max_new_tokens=0", f"data.path={SHAKESPEARE}", *sets):
        argv += ["--set", item]
    return argv


def sft(*sets: str, extra: tuple[str, ...] = ()) -> list[str]:
    """Trainer argv for the SFT smoke config on the model dir ./model (see `model`)."""
    return ["train", "sft", *sft_args(Path("model"), "base_model=./model", "train.max_steps=1", *sets), *extra]


def rl(*sets: str) -> list[str]:
    """Trainer argv for the RL smoke config on the model dir ./model (see `model`)."""
    return ["train", "rl", *rl_args(Path("model"), "base_model=./model", "train.max_steps=1", *sets)]


def suite(check: str = "exit_ok") -> bytes:
    """A regression suite of one run ("nano", the smoke config as cfg.yaml) with this check."""
    return f"steps:\n  - run: nano\n    recipe: nanogpt\n    config: cfg.yaml\n    checks: [{check}]\n".encode()


def subprocess_run(argv: list[str]) -> list[str]:
    """The same trainer argv, through the real `python -m mllm_jax` in a subprocess."""
    return ["python", "-m", "mllm_jax", *argv]


def files(**contents: bytes) -> Setup:
    """Write these files (name -> bytes) into the test's directory."""
    def setup(tmp: Path, request: pytest.FixtureRequest) -> None:
        for name, data in contents.items():
            path = tmp / name.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return setup


def model(change: Callable[[Path], None] = lambda d: None) -> Setup:
    """Copy the tiny HF model to ./model, then damage it with `change(model_dir)`."""
    def setup(tmp: Path, request: pytest.FixtureRequest) -> None:
        shutil.copytree(request.getfixturevalue("tiny_qwen2"), tmp / "model")
        change(tmp / "model")
    return setup


def truncate(name: str, keep: float) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: int(len(data) * keep)])
    return change


def write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


def remove(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def nothing(tmp: Path, request: pytest.FixtureRequest) -> None:
    pass


def index_with(token: str) -> Setup:
    """./index.json: the Industrial index with the first token of its first item replaced."""
    import json

    def setup(tmp: Path, request: pytest.FixtureRequest) -> None:
        index = json.loads(INDUSTRIAL_INDEX.read_text())
        first = next(iter(index))
        index[first] = [token, *index[first][1:]]
        (tmp / "index.json").write_text(json.dumps(index))
        model()(tmp, request)
    return setup


@pytest.fixture(scope="module")
def nano_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A completed run of `nano()`'s settings (2 steps, its final checkpoint), run once."""
    out = tmp_path_factory.mktemp("nano-run") / "done"
    argv = nano(f"output_dir={out}")
    proc = subprocess.run([sys.executable, "-m", "mllm_jax", *argv], env=trainer_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def finished_run(tmp: Path, request: pytest.FixtureRequest) -> None:
    """runs/done: a completed run with its checkpoint (copied from `nano_run`)."""
    shutil.copytree(request.getfixturevalue("nano_run"), tmp / "runs" / "done")


VM_CREATE = ["mllm", "vm", "create", "x", "--zone", "us-east1-d"]


def report(**changes: object) -> bytes:
    """An `mllm regress` report of one run, with `changes` (a tampered one)."""
    import json

    observed = changes.pop("observed", 1.5)
    data = {"suite": "cpu", "suite_file": "configs/regress/cpu.yaml", "commit": "abc", "started": "2026-01-01T00:00:00Z",
            "target": {"kind": "local"}, "runs": [{"name": "nano", "exit_code": 0, "error": None, "checks": [
                {"check": "eval/loss", "observed": observed, "status": "pass"}]}], **changes}
    return json.dumps(data).encode()


ROWS: list[tuple[str, list[str], Setup]] = [
    # --- nanoGPT values ------------------------------------------------------------------------
    ("checkpoint-dir-under-a-file", nano("train.checkpoint_dir=/dev/null/ckpt"), nothing),
    ("lr-negative", nano("train.learning_rate=-1"), nothing),
    ("lr-zero", nano("train.learning_rate=0"), nothing),
    ("lr-nan", nano("train.learning_rate=.nan"), nothing),  # config.py (others)
    ("block-size-zero", nano("model.block_size=0"), nothing),
    ("block-size-negative", nano("model.block_size=-5"), nothing),
    ("n-embd-negative", nano("model.n_embd=-64"), nothing),
    ("n-head-zero", nano("model.n_head=0"), nothing),
    ("n-layer-zero", nano("model.n_layer=0"), nothing),
    ("n-embd-not-divisible", nano("model.n_embd=65"), nothing),
    ("dropout-one", nano("model.dropout=1.0"), nothing),
    ("seed-negative", nano("seed=-1"), nothing),
    ("min-lr-negative", nano("train.min_lr=-1e-4"), nothing),
    ("lr-decay-steps-zero", nano("train.lr_decay_steps=0"), nothing),
    ("beta2-one", nano("train.beta2=1.0"), nothing),
    ("batch-zero", nano("train.global_batch_size=0"), nothing),
    ("eval-iters-zero", nano("train.eval_iters=0"), nothing),
    ("temperature-zero", nano("sample.temperature=0"), nothing),
    ("unknown-key", nano("train.max_step=1"), nothing),
    ("unknown-recipe", ["train", "nope"], nothing),
    # --- nanoGPT data ---------------------------------------------------------------------------
    ("data-missing", nano("data.path=missing.txt"), nothing),
    ("data-binary", nano("data.path=data.bin"), files(**{"data.bin": BINARY})),
    ("data-empty", nano("data.path=empty.txt"), files(**{"empty.txt": b""})),
    ("data-too-short", nano("data.path=short.txt"), files(**{"short.txt": b"hello world, " * 20})),
    # --- config file, --set, output_dir, --resume (others) --------------------------------------
    ("config-missing", nano(config=Path("missing.yaml")), nothing),
    ("config-binary", nano(config=Path("bin.yaml")), files(**{"bin.yaml": BINARY})),
    ("set-bad-yaml", nano("train.max_steps=[1, 2"), nothing),
    ("set-newline", nano("wandb.name=a\nb"), nothing),
    ("resume-fresh-output-dir", nano("output_dir=fresh", extra=("--resume",)), nothing),
    ("resume-completed-run", nano("output_dir=runs/done", extra=("--resume",)), finished_run),
    ("resume-max-steps-below-checkpoint", nano("output_dir=runs/done", "train.max_steps=1", extra=("--resume",)),
     finished_run),
    ("resume-changes-param-dtype", nano("output_dir=runs/done", "train.max_steps=4", "jax.param_dtype=bfloat16",
                                        extra=("--resume",)), finished_run),
    ("resume-changes-the-model", nano("output_dir=runs/done", "train.max_steps=4", "model.n_layer=1",
                                      extra=("--resume", "--allow-config-change", "model.dropout")), finished_run),
    ("resume-allow-change-typo", nano("output_dir=runs/done", "train.max_steps=4", "model.dropout=0.1",
                                      extra=("--resume", "--allow-config-change", "model.dropuot")), finished_run),
    ("allow-change-without-resume", nano(extra=("--allow-config-change", "model.dropout")), nothing),
    ("output-dir-is-a-file", nano("output_dir=taken"), files(taken=b"x")),
    ("output-dir-unwritable", nano("output_dir=/sys/mllm-bad-input-run"), nothing),
    # --- env files ------------------------------------------------------------------------------
    ("env-file-missing", nano(extra=("--env-file", "missing.env")), nothing),
    ("env-file-binary", nano(extra=("--env-file", "bin.env")), files(**{"bin.env": BINARY})),
    # --- sft --------------------------------------------------------------------------------------
    ("sft-lr-negative", sft("train.learning_rate=-1"), nothing),
    ("sft-seed-negative", sft("seed=-1"), nothing),
    ("sft-splash-on-cpu", sft("train.attention=splash"), model()),
    ("sft-cudnn-on-cpu", sft("train.attention=cudnn"), model()),
    ("sft-no-model-dir", sft(), nothing),
    ("sft-corrupt-safetensors", sft(), model(write("model.safetensors", b"\xff" * 64 + BINARY))),
    ("sft-truncated-safetensors", sft(), model(truncate("model.safetensors", 0.5))),
    ("sft-short-safetensors", sft(), model(write("model.safetensors", b"\x01\x02"))),
    ("sft-no-safetensors", sft(), model(remove("model.safetensors"))),
    ("sft-junk-tokenizer", sft(), model(write("tokenizer.json", b"{ not a tokenizer"))),
    ("sft-binary-tokenizer", sft(), model(write("tokenizer.json", BINARY))),
    ("sft-junk-config-json", sft(), model(write("config.json", b"[1, 2]"))),
    ("sft-binary-tokenizer-config", sft(), model(write("tokenizer_config.json", BINARY))),
    ("sft-binary-csv", sft("data.train_file=bin.csv"), model(lambda d: (d.parent / "bin.csv").write_bytes(BINARY))),
    ("sft-early-stopping-without-eval-file", sft("data.eval_file=''"), nothing),
    ("sft-eval-every-fraction-above-one", sft("train.eval_every=1.5"), nothing),
    ("sft-best-metric-not-eval", sft("train.best_metric=train/loss"), nothing),
    ("sft-no-category", sft("data.category=null"), nothing),
    ("sft-sid-token-special", sft("data.sid_index_path=index.json"), index_with("<|endoftext|>")),
    ("sft-sid-token-space", sft("data.sid_index_path=index.json"), index_with("<a 1>")),
    ("sft-sid-token-newline", sft("data.sid_index_path=index.json"), index_with("\n")),
    ("rl-sid-token-word", rl("data.sid_index_path=index.json"), index_with("x y")),
    ("sft-best-metric-not-produced", sft("run_mode=train_eval", "train.best_metric=eval/ndcg@7", "eval.topk=[1,5,10]"),
     nothing),
    ("nanogpt-best-metric-unknown", nano("train.load_best_model_at_end=true", "train.best_metric=eval/nope"), nothing),
    # --- rl -------------------------------------------------------------------------------------
    ("rl-no-base-model", rl("base_model=null"), nothing),
    ("rl-unknown-reward", rl("rl.reward=rouge"), nothing),
    ("rl-unknown-algorithm", rl("rl.algorithm=ppo"), nothing),
    ("rl-one-generation", rl("rl.num_generations=1"), nothing),
    ("rl-sync-alpha-above-one", rl("rl.ref_sync_alpha=1.5"), nothing),
    ("rl-best-metric-loss", rl("train.load_best_model_at_end=true"), nothing),
    ("rl-epsilon-above-one", rl("rl.epsilon=5"), nothing),
    ("rl-best-metric-not-produced", rl("train.load_best_model_at_end=true", "train.best_metric=eval/hr@7"), nothing),
    ("rl-prompts-not-divisible", rl("train.prompts_per_step=12"), model()),
    ("rl-no-model-dir", rl(), nothing),
    ("rl-missing-train-file", rl("data.train_file=missing.csv"), model()),
    # --- the real `python -m mllm_jax` ------------------------------------------------------------
    ("proc-n-head-zero", subprocess_run(nano("model.n_head=0")), nothing),
    ("proc-data-empty", subprocess_run(nano("data.path=empty.txt")), files(**{"empty.txt": b""})),
    ("proc-env-file-binary", subprocess_run(nano(extra=("--env-file", "bin.env"))), files(**{"bin.env": BINARY})),
    ("proc-sft-truncated-safetensors", subprocess_run(sft()), model(truncate("model.safetensors", 0.5))),
    # --- the `mllm` CLI ---------------------------------------------------------------------------
    ("api-unreachable", ["mllm", "vm", "list", "--zone", "us-east1-d"], nothing),
    ("api-unreachable-all-zones", ["mllm", "vm", "list", "--all-zones"], nothing),
    ("api-unreachable-describe", ["mllm", "vm", "describe", "x", "--zone", "us-east1-d"], nothing),
    ("project-bad", ["mllm", "vm", "list", "--zone", "us-east1-d", "--project", "bad/proj"], nothing),
    ("zone-bad", ["mllm", "vm", "list", "--zone", "useast1"], nothing),
    ("state-json-list", ["mllm", "vm", "list"], files(**{".mllm__state.json": b"[1, 2]"})),
    ("state-json-garbage", ["mllm", "vm", "list"], files(**{".mllm__state.json": BINARY})),
    ("state-json-zone-number", ["mllm", "vm", "list"], files(**{".mllm__state.json": b'{"zone": 5}'})),
    ("runs-json-list", ["mllm", "runs"], files(**{".mllm__runs.json": b"[]"})),
    ("runs-json-garbage", ["mllm", "runs"], files(**{".mllm__runs.json": b"{not json"})),
    ("env-push-src-missing", ["mllm", "env", "push", "--src", "missing.env", "--vm", "x", "--zone", "us-east1-d"],
     nothing),
    ("env-push-src-binary", ["mllm", "env", "push", "--src", "bin.env", "--vm", "x", "--zone", "us-east1-d"],
     files(**{"bin.env": BINARY})),
    ("env-push-src-empty", ["mllm", "env", "push", "--src", "empty.env", "--vm", "x", "--zone", "us-east1-d"],
     files(**{"empty.env": b"# nothing\n"})),
    ("vm-create-poll-negative", [*VM_CREATE, "--queued", "--poll", "-1"], nothing),
    ("vm-create-timeout-zero", [*VM_CREATE, "--timeout", "0"], nothing),
    ("vm-create-timeout-negative", [*VM_CREATE, "--timeout", "-5"], nothing),
    ("vm-create-valid-for-huge", [*VM_CREATE, "--queued", "--valid-for", "99999999999h"], nothing),
    ("vm-create-valid-for-zero", [*VM_CREATE, "--queued", "--valid-for", "0s"], nothing),
    ("vm-create-type-size", [*VM_CREATE, "--type", "v6e-7"], nothing),
    ("vm-create-version-shell", [*VM_CREATE, "--version", "x;y"], nothing),
    ("vm-create-reserved-space", [*VM_CREATE, "--queued", "--reserved", "a b"], nothing),
    ("vm-create-guaranteed-and-reserved", [*VM_CREATE, "--queued", "--guaranteed", "--reserved", "r1"], nothing),
    ("stop-grace-negative", ["mllm", "stop", "--local", "--grace", "-1"], nothing),
    ("status-missing-run", ["mllm", "status", "--local", "nanogpt-20260101-000000-abc1234"], nothing),
    ("stop-missing-run", ["mllm", "stop", "--local", "nanogpt-20260101-000000-abc1234"], nothing),
    ("launch-resume-empty", ["mllm", "launch", "nanogpt", "--local", "--config", "cfg.yaml", "--resume", ""],
     files(**{"cfg.yaml": SMOKE.read_bytes()})),
    # others:
    ("fetch-summary-local-missing", ["mllm", "fetch-summary", "--local", "nanogpt-20260101-000000-abc1234"], nothing),
    ("logs-follow-local-missing", ["mllm", "logs", "-f", "--local", "nanogpt-20260101-000000-abc1234"], nothing),
    ("launch-local-unknown-recipe", ["mllm", "launch", "nanogpt;touch pwned", "--local", "--config", "cfg.yaml"],
     files(**{"cfg.yaml": SMOKE.read_bytes()})),
    ("launch-local-set-newline", ["mllm", "launch", "nanogpt", "--local", "--config", "cfg.yaml", "--set",
                                  "wandb.name=x\nMLLM_JOB_EOF\ntouch pwned\nexit 0"],
     files(**{"cfg.yaml": SMOKE.read_bytes()})),
    ("launch-bucket-not-gs", ["mllm", "launch", "nanogpt", "--local", "--config", "cfg.yaml", "--set",
                              f"data.path={SHAKESPEARE}", "--bucket", "s3://my-bucket"],
     files(**{"cfg.yaml": SMOKE.read_bytes()})),
    ("launch-allow-change-without-resume", ["mllm", "launch", "nanogpt", "--local", "--config", "cfg.yaml",
                                            "--allow-config-change", "model.dropout"],
     files(**{"cfg.yaml": SMOKE.read_bytes()})),
    ("launch-allow-change-typo", ["mllm", "launch", "nanogpt", "--local", "--config", "cfg.yaml", "--set",
                                  f"data.path={SHAKESPEARE}", "--resume", "latest", "--allow-config-change", "modle"],
     files(**{"cfg.yaml": SMOKE.read_bytes()})),
    ("launch-recover-local", ["mllm", "launch", "nanogpt", "--local", "--config", "cfg.yaml", "--recover"],
     files(**{"cfg.yaml": SMOKE.read_bytes()})),
    ("regress-suite-missing", ["mllm", "regress", "nope", "--local"], nothing),
    ("regress-suite-binary", ["mllm", "regress", "suite.yaml", "--local"], files(**{"suite.yaml": BINARY})),
    ("regress-suite-not-yaml", ["mllm", "regress", "suite.yaml", "--local"], files(**{"suite.yaml": b"steps: [\n"})),
    ("regress-check-key-unknown", ["mllm", "regress", "suite.yaml", "--local"],
     files(**{"cfg.yaml": SMOKE.read_bytes(), "suite.yaml": suite("{metric: eval/loss, tol: 0.1}")})),
    ("regress-check-two-bounds", ["mllm", "regress", "suite.yaml", "--local"],
     files(**{"cfg.yaml": SMOKE.read_bytes(), "suite.yaml": suite("{metric: eval/loss, tolerance: 1, falls: true}")})),
    ("regress-check-step-true", ["mllm", "regress", "suite.yaml", "--local"],
     files(**{"cfg.yaml": SMOKE.read_bytes(), "suite.yaml": suite("{metric: eval/loss, step: true, tolerance: 1}")})),
    ("regress-check-max-ratio-inf", ["mllm", "regress", "suite.yaml", "--local"],
     files(**{"cfg.yaml": SMOKE.read_bytes(), "suite.yaml": suite("{metric: eval/loss, max_ratio: .inf}")})),
    ("regress-config-missing", ["mllm", "regress", "suite.yaml", "--local"], files(**{"suite.yaml": suite()})),
    ("regress-set-unknown-run", ["mllm", "regress", "suite.yaml", "--local", "--set", "other:train.max_steps=1"],
     files(**{"cfg.yaml": SMOKE.read_bytes(), "suite.yaml": suite()})),
    ("regress-set-unknown-key", ["mllm", "regress", "suite.yaml", "--local", "--set", "nano:train.max_stepz=1"],
     files(**{"cfg.yaml": SMOKE.read_bytes(), "suite.yaml": suite()})),
    ("regress-compare-missing", ["mllm", "regress", "--compare", "a.json", "b.json"], nothing),
    ("regress-record-not-a-report", ["mllm", "regress", "--record", "r.json"], files(**{"r.json": b'{"a": 1}'})),
    ("regress-record-suite-escapes", ["mllm", "regress", "--record", "r.json"],
     files(**{"r.json": report(suite="../outside")})),
    ("regress-record-started-newline", ["mllm", "regress", "--record", "r.json"],
     files(**{"r.json": report(started="2026-01-01\nnano:\n  eval/loss: 0")})),
    ("regress-compare-binary", ["mllm", "regress", "--compare", "bin.json", "bin.json"], files(**{"bin.json": BINARY})),
    ("regress-compare-observed-escape", ["mllm", "regress", "--compare", "r.json", "r.json"],
     files(**{"r.json": report(observed="\x1b]0;pwned\x07")})),
    ("regress-tiny-model-outside", ["mllm", "regress", "suite.yaml", "--local"],
     files(**{"cfg.yaml": SMOKE.read_bytes(), "suite.yaml": b"steps:\n  - tiny_model: ../outside/x\n"})),
    ("regress-reports-not-writable", ["mllm", "regress", "suite.yaml", "--local"],
     files(**{"cfg.yaml": SMOKE.read_bytes(), "suite.yaml": suite(), "reports": b"a file, not a dir"})),
    ("watch-run-not-launched", ["mllm", "watch", "nanogpt-20260101-000000-abc1234"], nothing),
    ("watch-run-id-bad", ["mllm", "watch", "../etc"], nothing),
    ("watch-plan-garbage", ["mllm", "watch", "nanogpt-20260101-000000-abc1234"],
     files(**{".mllm__watch__nanogpt-20260101-000000-abc1234.json": b'{"run": 1}'})),
]


def snapshot(*roots: Path) -> dict[str, object]:
    """Every file (by content), directory and symlink (by target) under `roots`."""
    found: dict[str, object] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath, name)
                if path.is_symlink():
                    found[str(path)] = ("link", os.readlink(path))
                elif path.is_dir():
                    found[str(path)] = "dir"
                else:
                    found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def assert_one_line_error(code: int, stdout: str, stderr: str) -> None:
    assert code == 2, (code, stdout, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > len("error: "), stderr
    assert "Traceback" not in stdout + stderr


def assert_unchanged(before: dict[str, object], after: dict[str, object]) -> None:
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"created, changed or removed: {changed}"


@pytest.mark.parametrize("argv, setup", [pytest.param(argv, setup, id=name) for name, argv, setup in ROWS])
def test_bad_input(argv: list[str], setup: Setup, tmp_path: Path, request: pytest.FixtureRequest,
                   monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    (work / "runs" / "old-run").mkdir(parents=True)  # a finished run that runs/latest points at
    (work / "runs" / "latest").symlink_to("old-run")
    setup(work, request)
    before = snapshot(tmp_path)
    if argv[0] == "train":
        from mllm_jax import train

        monkeypatch.chdir(work)
        monkeypatch.setenv("JAX_PLATFORMS", "cpu")
        monkeypatch.setenv("WANDB_SILENT", "true")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        capfd.readouterr()
        code = train.main(argv)
        out = capfd.readouterr()
        stdout, stderr = out.out, out.err
    elif argv[0] == "python":
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=work, env=trainer_env(), capture_output=True,
                              text=True, timeout=120)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    else:
        env = launcher_env(tmp_path, f"http://127.0.0.1:{free_port()}")  # nothing listens there
        proc = subprocess.run([MLLM, *argv[1:]], cwd=work, env=env, capture_output=True, text=True, timeout=120)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    assert_one_line_error(code, stdout, stderr)
    assert_unchanged(before, snapshot(tmp_path))


# --- on two sshd workers (e2e) -------------------------------------------------------------------

RUN = "nanogpt-20260101-000000-abc1234"  # a finished run on worker 0 (its summary only)
MARKER = "/tmp/mllm-bad-input-marker"
# What a worker may have written since the marker, outside the big read-only trees of its /root.
NEWER = (r"find /root /tmp -xdev \( -path /root/.pyenv -o -path /root/.cache -o -path /root/.rustup "
         rf"-o -path /root/.cargo -o -path /root/.npm -o -path /root/.m2 \) -prune -o -newer {MARKER} -print")

WORKER_ROWS: list[tuple[str, list[str], Setup]] = [
    ("worker-empty", ["exec", "--worker", "", "--", "touch", "/root/pwned"], nothing),
    ("worker-comma", ["exec", "--worker", ",", "--", "touch", "/root/pwned"], nothing),
    ("worker-out-of-range", ["exec", "--worker", "5", "--", "touch", "/root/pwned"], nothing),
    ("worker-not-an-index", ["exec", "--worker", "one", "--", "touch", "/root/pwned"], nothing),
    ("env-push-dest-missing-dir", ["env", "push", "--src", "good.env", "--dest", "/no/such/dir/.env"],
     files(**{"good.env": GOOD_ENV})),
    ("env-push-src-binary-remote", ["env", "push", "--src", "bin.env"], files(**{"bin.env": BINARY})),
    # others:
    ("fetch-summary-dest-is-a-file", ["fetch-summary", RUN, "--dest", "taken"], files(taken=b"x")),
]


@pytest.fixture(scope="module")
def vm(hosts, tmp_path_factory: pytest.TempPathFactory):
    """A 2-worker TPU VM (remembered in the laptop dir's .mllm/), worker 0 holding the run RUN;
    yields (laptop dir, environment for `mllm`)."""
    from harness.tpu_slice import ZONE, Slice

    laptop = tmp_path_factory.mktemp("laptop")
    with Slice(hosts).api as api:
        env = launcher_env(laptop, api.endpoint)
        created = subprocess.run([MLLM, "vm", "create", "pair", "--zone", ZONE, "--type", "v4-16"], cwd=laptop,
                                 env=env, capture_output=True, text=True, timeout=120)
        assert created.returncode == 0, created.stderr
        made = subprocess.run([MLLM, "exec", "--worker", "0", "--", "sh", "-c",
                               f"mkdir -p ~/mllm-jax/runs/{RUN} && echo '{{\"status\": \"completed\"}}' "
                               f"> ~/mllm-jax/runs/{RUN}/run_summary.json"],
                              cwd=laptop, env=env, capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stdout + made.stderr
        yield laptop, env


@pytest.mark.e2e
@pytest.mark.parametrize("argv, setup", [pytest.param(argv, setup, id=name) for name, argv, setup in WORKER_ROWS])
def test_bad_input_on_workers(argv: list[str], setup: Setup, vm, request: pytest.FixtureRequest) -> None:
    laptop, env = vm
    work = laptop / request.node.callspec.id
    work.mkdir()
    shutil.copytree(laptop / ".mllm", work / ".mllm")  # the remembered VM
    setup(work, request)

    def mllm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([MLLM, *args], cwd=work, env=env, capture_output=True, text=True, timeout=120)

    assert mllm("exec", "--", "touch", MARKER).returncode == 0
    before = snapshot(laptop)
    out = mllm(*argv)
    assert_one_line_error(out.returncode, out.stdout, out.stderr)
    assert_unchanged(before, snapshot(laptop))
    newer = mllm("exec", "--", "sh", "-c", NEWER)
    assert newer.returncode == 0 and not newer.stdout.strip(), f"written on the workers: {newer.stdout}"
