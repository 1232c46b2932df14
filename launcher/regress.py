"""`mllm regress SUITE`: the seed runbook as one command.

A suite (YAML under configs/regress/) lists steps: `sync` (ship the commit to the workers),
`versions` (every machine's python/JAX stack/backend/devices), `tiny_model` (build the tiny Qwen2
the CPU configs train), and runs (recipe + config + overrides), each with checks judged on its
run_summary.json and metrics.jsonl. Each run goes through the same code as `mllm launch --follow`
and `mllm fetch-summary`; a run that fails is reported with its error and the suite goes on.
Expected values live apart from the suite, in configs/regress/baselines/<suite>.yaml, written
only by `mllm regress --record REPORT` (a human reviews the diff and commits it). The report is
written in the runbook's shape to reports/<suite>-<UTC time>-<vm or local>.md and .json;
`--compare A B` lists what changed between two reports.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from launcher import jobs, readback, remote, ssh, sync
from launcher.errors import LauncherError
from mllm_jax import contracts

SUITES_DIR = Path("configs") / "regress"
"""Suites, under the repository root; their baselines in SUITES_DIR/baselines/<suite>.yaml."""
BASELINES = "baselines"
MODELS_DIR = "models"
"""Where a suite's `tiny_model` may be written: the repository's git-ignored models dir."""
REPORTS_DIR = Path("reports")
"""Reports, under the current directory."""
SIMPLE_CHECKS = ("exit_ok", "wandb_url")
"""Checks named by a word: the run exited 0 with no traceback in any worker's log; its summary has
a W&B run URL (online mode)."""
STEP_KINDS = ("sync", "versions", "tiny_model", "run")
RUN_KEYS = {"run", "recipe", "config", "set", "checks"}
CHECK_KEYS = {"metric", "summary", "step", "tolerance", "max_ratio", "falls"}


# -- the suite -----------------------------------------------------------------------------------

@dataclass
class Check:
    """One judgement of a run. A `metric` (from metrics.jsonl, at `step` or its last value) or a
    `summary` key (dotted, from run_summary.json) is compared with the baseline: within
    `tolerance` (absolute), or at most `max_ratio` times it; `falls`: its last value is below its
    first (no baseline). Or one of SIMPLE_CHECKS."""

    kind: str
    """exit_ok | wandb_url | tolerance | max_ratio | falls"""
    metric: str | None = None
    summary: str | None = None
    step: int | None = None
    bound: float | None = None

    @property
    def name(self) -> str:
        """The check's name in reports and its key in the baseline file."""
        if self.kind in SIMPLE_CHECKS:
            return self.kind
        what = self.metric or f"summary.{self.summary}"
        return f"{what} falls" if self.kind == "falls" else f"{what}@{self.step}" if self.step is not None else what

    @property
    def needs_baseline(self) -> bool:
        return self.kind in ("tolerance", "max_ratio")


@dataclass
class RunStep:
    name: str
    recipe: str
    config: str
    overrides: list[str]
    checks: list[Check]


@dataclass
class Suite:
    name: str
    path: Path
    steps: list[str | RunStep]
    tiny_model: str | None = None
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def runs(self) -> list[RunStep]:
        return [s for s in self.steps if isinstance(s, RunStep)]

    @property
    def baseline_path(self) -> Path:
        return self.path.parent / BASELINES / f"{self.name}.yaml"


def suite_path(suite: str, root: Path) -> Path:
    """A suite by name (configs/regress/NAME.yaml under the repo root) or by path to a YAML file."""
    if suite.endswith((".yaml", ".yml")):
        path = Path(suite)
    elif contracts.is_run_id(suite):
        path = root / SUITES_DIR / f"{suite}.yaml"
    else:
        raise LauncherError(f"SUITE {suite!r}: expected a suite name or a .yaml file")
    if not path.is_file():
        known = sorted(p.stem for p in (root / SUITES_DIR).glob("*.yaml"))
        raise LauncherError(f"SUITE {suite}: {path} not found (suites: {', '.join(known) or 'none'})")
    return path


def load_suite(path: Path, root: Path) -> Suite:
    """Parse and check a suite: every key known, every config file inside the repository."""
    where = str(path)
    data = _yaml(path)
    if not isinstance(data, dict) or set(data) - {"steps"} or not isinstance(data.get("steps"), list):
        raise LauncherError(f"{where}: expected a mapping with one key, steps: a list")
    suite = Suite(path.stem, path, [])
    names: set[str] = set()
    for i, item in enumerate(data["steps"]):
        at = f"{where}: steps[{i}]"
        if item in ("sync", "versions"):
            suite.steps.append(item)
        elif isinstance(item, dict) and set(item) == {"tiny_model"} and isinstance(item["tiny_model"], str):
            models = (root / MODELS_DIR).resolve()
            if not (root / item["tiny_model"]).resolve().is_relative_to(models) or Path(item["tiny_model"]).is_absolute():
                raise LauncherError(f"{at}.tiny_model {readback.printable(item['tiny_model'])!r}: expected a directory "
                                    f"under {MODELS_DIR}/ (the repository's ignored models dir), e.g. {MODELS_DIR}/tiny-qwen2")
            suite.tiny_model = item["tiny_model"]
            suite.steps.append("tiny_model")
        elif isinstance(item, dict) and "run" in item:
            run = _run_step(item, at, root)
            if run.name in names:
                raise LauncherError(f"{at}.run: {run.name!r} is used twice")
            names.add(run.name)
            suite.steps.append(run)
        else:
            raise LauncherError(f"{at}: expected sync, versions, {{tiny_model: DIR}} or {{run: NAME, recipe: ..., "
                                "config: ..., set: [...], checks: [...]}}")
    if not suite.runs:
        raise LauncherError(f"{where}: no run steps")
    suite.baselines = load_baselines(suite)
    return suite


def _run_step(item: dict, at: str, root: Path) -> RunStep:
    unknown = set(item) - RUN_KEYS
    if unknown:
        raise LauncherError(f"{at}: unknown key {sorted(unknown)[0]!r} (expected {', '.join(sorted(RUN_KEYS))})")
    name, recipe, config = item.get("run"), item.get("recipe"), item.get("config")
    if not isinstance(name, str) or not contracts.is_run_id(name):
        raise LauncherError(f"{at}.run: expected a name (letters, digits, '.', '_' or '-'), got {name!r}")
    for key, value in (("recipe", recipe), ("config", config)):
        if not isinstance(value, str) or not value:
            raise LauncherError(f"{at}.{key}: expected a string")
    if not (root / config).is_file():
        raise LauncherError(f"{at}.config: {config} not found under {root}")
    overrides = item.get("set", [])
    if not isinstance(overrides, list) or not all(isinstance(s, str) and "=" in s for s in overrides):
        raise LauncherError(f"{at}.set: expected a list of KEY=VALUE strings")
    checks = item.get("checks")
    if not isinstance(checks, list) or not checks:
        raise LauncherError(f"{at}.checks: expected a non-empty list")
    return RunStep(name, recipe, config, list(overrides), [_check(c, f"{at}.checks[{j}]") for j, c in enumerate(checks)])


def _check(item: Any, at: str) -> Check:
    if isinstance(item, str):
        if item not in SIMPLE_CHECKS:
            raise LauncherError(f"{at}: {item!r} is not a check (expected {' or '.join(SIMPLE_CHECKS)}, or a mapping)")
        return Check(item)
    if not isinstance(item, dict):
        raise LauncherError(f"{at}: expected a check name or a mapping")
    unknown = set(item) - CHECK_KEYS
    if unknown:
        raise LauncherError(f"{at}: unknown key {sorted(unknown)[0]!r} (expected {', '.join(sorted(CHECK_KEYS))})")
    sources = [k for k in ("metric", "summary") if k in item]
    kinds = [k for k in ("tolerance", "max_ratio", "falls") if k in item]
    if len(sources) != 1 or len(kinds) != 1:
        raise LauncherError(f"{at}: expected one of metric/summary and one of tolerance/max_ratio/falls")
    source, kind = sources[0], kinds[0]
    if not isinstance(item[source], str) or not item[source]:
        raise LauncherError(f"{at}.{source}: expected a name")
    step = item.get("step")
    if step is not None and (source != "metric" or isinstance(step, bool) or not isinstance(step, int) or step < 0
                             or kind == "falls"):
        raise LauncherError(f"{at}.step: expected a step number >= 0, with a metric and tolerance or max_ratio")
    bound = item[kind]
    if kind == "falls":
        if bound is not True or source != "metric":
            raise LauncherError(f"{at}.falls: expected true, with a metric")
        bound = None
    elif isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound < math.inf:
        raise LauncherError(f"{at}.{kind}: expected a finite number > 0, got {bound!r}")
    return Check(kind, item.get("metric"), item.get("summary"), step, None if bound is None else float(bound))


def load_baselines(suite: Suite) -> dict[str, dict[str, float]]:
    """{run name: {check name: value}}; no file yet is no baselines."""
    path = suite.baseline_path
    if not path.exists():
        return {}
    data = _yaml(path) or {}
    ok = isinstance(data, dict) and all(isinstance(v, dict) and all(isinstance(x, (int, float)) and not
                                        isinstance(x, bool) for x in v.values()) for v in data.values())
    if not ok:
        raise LauncherError(f"{path}: expected {{run: {{check: number}}}} (written by `mllm regress --record`)")
    return {str(r): {str(k): float(x) for k, x in v.items()} for r, v in data.items()}


def overrides_by_run(suite: Suite, items: list[str]) -> dict[str, list[str]]:
    """`--set [RUN:]KEY=VALUE`: for RUN only, or (no RUN) for every run of the suite."""
    out: dict[str, list[str]] = {r.name: [] for r in suite.runs}
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise LauncherError(f"--set {item!r}: expected [RUN:]KEY=VALUE")
        run, colon, rest = key.partition(":")
        if not colon:
            for names in out.values():
                names.append(item)
        elif run not in out:
            raise LauncherError(f"--set {item!r}: no run {run!r} in suite {suite.name} (runs: {', '.join(out)})")
        else:
            out[run].append(item.split(":", 1)[1])
    return out


def validate(suite: Suite, overrides: dict[str, list[str]], root: Path) -> None:
    """Every run's config and overrides resolve through the trainer's own loader, before any run
    starts (what `mllm launch` checks first, for the whole suite at once)."""
    from launcher.cluster import check_config

    for run in suite.runs:
        try:
            check_config(run.recipe, str(root / run.config), [*run.overrides, *overrides[run.name]])
        except LauncherError as e:
            raise LauncherError(f"{suite.path}: run {run.name}: {e}") from None


# -- running it ----------------------------------------------------------------------------------

@dataclass
class Judgement:
    check: str
    status: str
    """pass | fail | new (no baseline recorded yet)"""
    observed: float | str | None
    expected: str
    detail: str
    delta: float | None = None


def run_suite(suite: Suite, cluster: Any, overrides: dict[str, list[str]], root: Path,
              run_preflight: bool = True) -> dict[str, Any]:
    """Every step in order, on `cluster` (a launcher.cluster.Cluster); the report (a dict)."""
    target = ({"kind": "local", "machine": remote.laptop_versions().get("os")} if cluster.is_local else
              {"kind": "vm", "vm": cluster.vm, "zone": cluster.zone, "project": cluster.project,
               "accelerator_type": cluster.accelerator_type, "workers": len(cluster.workers)})
    where_file = suite.path.relative_to(root) if suite.path.is_relative_to(root) else suite.path
    report: dict[str, Any] = {"suite": suite.name, "suite_file": str(where_file), "started": _utc(), "target": target,
                              "commit": sync.head_or_none(root), "dirty": _dirty(root), "environment": {},
                              "steps": [], "runs": []}
    where = " --local" if cluster.is_local else ""
    for step in suite.steps:
        if step == "sync":
            _step(report, "mllm sync", lambda: _sync(cluster, report))
        elif step == "versions":
            _step(report, f"mllm versions{where}", lambda: _versions(cluster, report))
        elif step == "tiny_model":
            _step(report, f"python -m mllm_jax tiny-model {suite.tiny_model}", lambda: _tiny_model(suite, root))
        else:
            report["runs"].append(_run(step, cluster, overrides[step.name], suite, root, where, run_preflight))
    report["finished"] = _utc()
    report["passed"] = all(s["exit_code"] == 0 for s in report["steps"]) and all(r["passed"] for r in report["runs"])
    return report


def _step(report: dict, command: str, do: Callable[[], str]) -> None:
    ssh.emit("regress", command)
    try:
        detail, code = do(), 0
    except (LauncherError, ssh.ConnectionLost, *ssh.TRANSPORT_ERRORS) as e:
        detail, code = str(e) or type(e).__name__, 1
    ssh.emit("regress", f"{command}: exit {code}: {detail}")
    report["steps"].append({"command": command, "exit_code": code, "detail": detail})


def _sync(cluster: Any, report: dict) -> str:
    if cluster.is_local:
        return "local: the runs use this checkout as it is"
    sha = cluster.sync("HEAD")
    report["commit"] = sha
    return f"workers at {sha[:12]}"


def _versions(cluster: Any, report: dict) -> str:
    if cluster.is_local:
        found = {0: _local_versions()}
        laptop = found[0]
    else:
        laptop, found, _ = cluster.versions()
    report["environment"] = {"laptop": laptop, "workers": {str(i): v for i, v in found.items()}}
    w = found[min(found)]
    return (f"{len(found)} worker(s): python {w.get('python')}, jax {w.get('jax')}, backend {w.get('backend')}, "
            f"{w.get('device_count')} devices")


def _local_versions() -> dict:
    """This machine as a worker sees itself: the versions script run by this interpreter (the
    launcher itself never imports JAX)."""
    out = subprocess.run([sys.executable, "-c", remote.VERSIONS_SCRIPT, *remote.VERSION_PACKAGES],
                         capture_output=True, text=True, timeout=300)
    for line in out.stdout.splitlines():
        if line.startswith("MLLM_VERSIONS "):
            return json.loads(line[len("MLLM_VERSIONS "):])
    raise LauncherError(f"could not read this machine's versions (exit {out.returncode}): {out.stderr.strip()[-300:]}")


def _tiny_model(suite: Suite, root: Path) -> str:
    out = root / str(suite.tiny_model)
    if (out / "config.json").is_file():
        return f"{suite.tiny_model} is there"
    done = subprocess.run([sys.executable, "-m", "mllm_jax", "tiny-model", str(out)], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if done.returncode:
        raise LauncherError(f"tiny-model {suite.tiny_model}: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    return f"wrote {suite.tiny_model}"


def _run(step: RunStep, cluster: Any, extra: list[str], suite: Suite, root: Path, where: str,
         run_preflight: bool) -> dict[str, Any]:
    """Launch, follow, fetch, judge: one run's entry of the report. A run that fails is judged
    (and reported with its error), never raised."""
    sets = [*step.overrides, *extra]
    command = " ".join(["mllm launch", step.recipe, "--config", step.config, *[f"--set {s}" for s in sets],
                        f"--follow{where}"])
    ssh.emit("regress", command)
    entry: dict[str, Any] = {"name": step.name, "command": command, "exit_code": None, "run_id": None,
                             "summary_path": None, "wandb": None, "error": None, "checks": []}
    summary: dict[str, Any] = {}
    metrics: list[dict] = []
    logs: dict[str, str] = {}
    try:
        run = cluster.launch(step.recipe, str(root / step.config), sets, sync_first=not cluster.is_local,
                             run_preflight=run_preflight)
        entry["run_id"] = run.id
        entry["exit_code"] = run.wait()
        logs = {t.label: jobs.read_log(t, run.id) for t in run.targets}
        summary, index = run.fetch_summary(Path(contracts.RUNS_DIR))
        entry["summary_path"] = str(Path(index["dest"]) / contracts.SUMMARY_FILE)
        metrics = _metrics(Path(index["dest"]) / contracts.METRICS_FILE)
    except (LauncherError, ssh.ConnectionLost, *ssh.TRANSPORT_ERRORS) as e:
        # No summary: the trainer refused its input (its one `error: ` line) or died, or the launch failed.
        entry["error"] = _log_error(logs) or str(e) or type(e).__name__
        if entry["exit_code"] is None:
            entry["exit_code"] = 2
    entry["error"] = summary.get("error") or entry["error"]
    entry["wandb"] = (summary.get("wandb") or {}).get("url")
    base = suite.baselines.get(step.name, {})
    judged = [judge(c, entry, summary, metrics, "\n".join(logs.values()), base.get(c.name)) for c in step.checks]
    entry["checks"] = [asdict(j) for j in judged]
    entry["passed"] = all(j.status != "fail" for j in judged)
    for j in judged:
        ssh.emit("regress", f"{step.name}: {j.check}: {j.status.upper()} {j.detail}")
    return entry


def _log_error(logs: dict[str, str]) -> str | None:
    """The trainer's last `error: ` line, from the first worker that printed one."""
    for label, text in logs.items():
        found = [line for line in text.splitlines() if line.startswith("error: ")]
        if found:
            return f"{label}: {found[-1].removeprefix('error: ')}"
    return None


def _metrics(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def judge(check: Check, entry: dict, summary: dict, metrics: list[dict], logs: str,
          baseline: float | None) -> Judgement:
    """One check of one run, with how far off it is."""
    if check.kind == "exit_ok":
        traceback = "Traceback (most recent call last)" in logs
        ok = entry["exit_code"] == 0 and not traceback and summary.get("status") == "completed"
        why = (f"exit {entry['exit_code']}" + (", a traceback in the log" if traceback else "")
               + (f": {entry['error']}" if entry.get("error") else ""))
        return Judgement(check.name, "pass" if ok else "fail", entry["exit_code"], "exit 0, no traceback", why)
    if check.kind == "wandb_url":
        url = (summary.get("wandb") or {}).get("url")
        return Judgement(check.name, "pass" if url else "fail", url, "a W&B run URL", url or "no W&B URL in the summary")
    if check.kind == "falls":
        series = [(e["step"], e[check.metric]) for e in metrics if _number(e.get(check.metric))]
        if len(series) < 2:
            return Judgement(check.name, "fail", None, "falls", f"{check.metric}: fewer than 2 values in metrics.jsonl")
        (s0, first), (s1, last) = series[0], series[-1]
        return Judgement(check.name, "pass" if last < first else "fail", last, f"< {first:.4g} (step {s0})",
                         f"{first:.4f} (step {s0}) -> {last:.4f} (step {s1})", last - first)
    observed = _observed(check, summary, metrics)
    if observed is None:
        where = f"at step {check.step} " if check.step is not None else ""
        return Judgement(check.name, "fail", None, "", f"no value {where}in the run's "
                                                       f"{'metrics.jsonl' if check.metric else 'run_summary.json'}")
    if baseline is None:
        return Judgement(check.name, "new", observed, "no baseline",
                         f"observed {observed:.6g}; no baseline yet (`mllm regress --record REPORT` stores it)")
    if check.kind == "tolerance":
        delta = observed - baseline
        ok = abs(delta) <= check.bound
        return Judgement(check.name, "pass" if ok else "fail", observed, f"{baseline:.6g} ± {check.bound:g}",
                         f"observed {observed:.6g}, expected {baseline:.6g} ± {check.bound:g} ({delta:+.4g})", delta)
    ratio = observed / baseline if baseline else math.inf
    ok = ratio <= check.bound
    return Judgement(check.name, "pass" if ok else "fail", observed, f"<= {check.bound:g} x {baseline:.6g}",
                     f"observed {observed:.6g} = {ratio:.3f} x the baseline {baseline:.6g} (bound {check.bound:g} x)",
                     observed - baseline)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _observed(check: Check, summary: dict, metrics: list[dict]) -> float | None:
    if check.summary:
        value: Any = summary
        for part in check.summary.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return float(value) if _number(value) else None
    found = [e[check.metric] for e in metrics if _number(e.get(check.metric))
             and (check.step is None or e.get("step") == check.step)]
    return float(found[-1]) if found else None


# -- the report ------------------------------------------------------------------------------------

def check_reports_writable() -> None:
    """Before the first run: a reports dir that cannot be written would lose the whole suite's
    report at its end."""
    try:
        REPORTS_DIR.mkdir(exist_ok=True)
        probe = REPORTS_DIR / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise LauncherError(f"{REPORTS_DIR.absolute()}: cannot write the report there ({e.strerror or e}); "
                            "make it writable first") from None


def write_report(report: dict) -> tuple[Path, Path]:
    """reports/<suite>-<UTC time>-<vm or local>.json and .md (a name this machine derived)."""
    where = report["target"].get("vm") or "local"
    stem = f"{report['suite']}-{report['started'].replace(':', '').replace('-', '')}-{where}"
    REPORTS_DIR.mkdir(exist_ok=True)
    js, md = REPORTS_DIR / f"{stem}.json", REPORTS_DIR / f"{stem}.md"
    js.write_text(json.dumps(report, indent=2) + "\n")
    md.write_text(markdown(report))
    return js, md


def markdown(report: dict) -> str:
    """The report in the seed runbook's shape: environment verified, the commands actually run
    with their exit codes, results per run, expected vs observed."""
    t = report["target"]
    lines = [f"# Regression suite `{report['suite']}`: {'PASSED' if report['passed'] else 'FAILED'}", "",
             f"- **Commit**: `{report['commit']}`{' (dirty working tree)' if report.get('dirty') else ''}",
             f"- **Suite**: `{report['suite_file']}`", f"- **Started / finished (UTC)**: {report['started']} / "
             f"{report.get('finished')}", "", "## Environment (verified)", ""]
    if t["kind"] == "vm":
        lines.append(f"- TPU VM: `{t['vm']}` (zone `{t['zone']}`, project `{t['project']}`, "
                     f"{t['accelerator_type']}, {t['workers']} worker(s))")
    else:
        lines.append(f"- This machine (`--local`): {t.get('machine')}")
    for name, v in sorted((report.get("environment") or {}).get("workers", {}).items()):
        lines.append(f"- worker {name}: {v.get('os')} (kernel `{v.get('kernel')}`), Python `{v.get('python')}`, "
                     f"JAX `{v.get('jax')}` (backend `{v.get('backend')}`, {v.get('device_count')} devices), "
                     f"Flax `{v.get('flax')}`, Optax `{v.get('optax')}`, W&B `{v.get('wandb')}`")
    lines += ["", "## Steps (commands actually run)", ""]
    for s in report["steps"]:
        lines.append(f"- `{s['command']}` (exit `{s['exit_code']}`): {s['detail']}")
    for r in report["runs"]:
        lines.append(f"- `{r['command']}` (exit `{r['exit_code']}`)")
    lines += ["", "## Results", ""]
    for r in report["runs"]:
        lines += [f"### {r['name']}: {'pass' if r['passed'] else 'FAIL'}", "",
                  f"- Run: `{r['run_id']}`", f"- W&B run: {r['wandb'] or 'none'}",
                  f"- Summary JSON: `{r['summary_path']}`"]
        if r["error"]:
            lines.append(f"- Error: `{r['error']}`")
        lines += ["", "| check | expected | observed | result |", "|---|---|---|---|"]
        for c in r["checks"]:
            lines.append(f"| {c['check']} | {c['expected']} | {c['detail']} | {c['status']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


REPORT_MAX_BYTES = 16 << 20


def read_report(path: str) -> dict:
    """A report, every field `compare` and `record` use checked (a report is a file anyone may
    have edited: it never chooses a path, and nothing in it reaches the terminal raw)."""
    text = readback.read_local(Path(path), REPORT_MAX_BYTES, f"REPORT {path}")
    try:
        data = json.loads(text, parse_constant=lambda c: c)
    except json.JSONDecodeError as e:
        raise LauncherError(f"REPORT {path}: not valid JSON ({e.msg}); give the .json report") from None
    if not isinstance(data, dict) or not {"suite", "runs", "commit"} <= set(data):
        raise LauncherError(f"REPORT {path}: not an `mllm regress` report")
    where = f"REPORT {path}"
    if not isinstance(data["suite"], str) or not contracts.is_run_id(data["suite"]):
        raise LauncherError(f"{where}: suite: expected a suite name, got {readback.printable(repr(data['suite']))[:80]}")
    readback.text(data["commit"], f"{where}: commit")
    readback.text(data.get("started"), f"{where}: started")
    readback.text(readback.mapping(data.get("target"), f"{where}: target").get("vm"), f"{where}: target.vm")
    workers = readback.mapping(readback.mapping(data.get("environment"), f"{where}: environment").get("workers"),
                               f"{where}: environment.workers")
    for w, found in workers.items():
        for k, v in readback.mapping(found, f"{where}: environment.workers.{w}", optional=False).items():
            _scalar(v, f"{where}: environment.workers.{w}.{k}")
    if not isinstance(data["runs"], list):
        raise LauncherError(f"{where}: runs: expected a list")
    for i, r in enumerate(data["runs"]):
        at = f"{where}: runs[{i}]"
        r = readback.mapping(r, at, optional=False)
        readback.text(r.get("name"), f"{at}.name", optional=False)
        readback.integer(r.get("exit_code"), f"{at}.exit_code")
        readback.text(r.get("error"), f"{at}.error", limit=100_000)
        if not isinstance(r.get("checks"), list):
            raise LauncherError(f"{at}.checks: expected a list")
        for j, c in enumerate(r["checks"]):
            c = readback.mapping(c, f"{at}.checks[{j}]", optional=False)
            readback.text(c.get("check"), f"{at}.checks[{j}].check", optional=False)
            readback.text(c.get("status"), f"{at}.checks[{j}].status", optional=False)
            _scalar(c.get("observed"), f"{at}.checks[{j}].observed")
    return data


def _scalar(value: Any, where: str) -> None:
    """A value a report may show: None, a bool, a finite number or one line of text."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        readback.number(value, where)
        return
    readback.text(value, where)


def compare(a: dict, b: dict) -> list[str]:
    """What changed from report `a` to `b`: commit, versions, and every check's observed value
    or result (runs only in one report are listed too)."""
    out = []
    if a["commit"] != b["commit"]:
        out.append(f"commit: {str(a['commit'])[:12]} -> {str(b['commit'])[:12]}")
    wa = (a.get("environment") or {}).get("workers", {})
    wb = (b.get("environment") or {}).get("workers", {})
    for w in sorted(set(wa) | set(wb)):
        for k in sorted(set(wa.get(w, {})) | set(wb.get(w, {}))):
            va, vb = wa.get(w, {}).get(k), wb.get(w, {}).get(k)
            if va != vb:
                out.append(f"worker {w} {k}: {va} -> {vb}")
    ra = {r["name"]: r for r in a["runs"]}
    rb = {r["name"]: r for r in b["runs"]}
    for name in [*ra, *[n for n in rb if n not in ra]]:
        if name not in rb or name not in ra:
            out.append(f"{name}: only in {'the first' if name in ra else 'the second'} report")
            continue
        ca = {c["check"]: c for c in ra[name]["checks"]}
        cb = {c["check"]: c for c in rb[name]["checks"]}
        for check in [*ca, *[c for c in cb if c not in ca]]:
            x, y = ca.get(check), cb.get(check)
            if x is None or y is None:
                out.append(f"{name} {check}: only in {'the first' if y is None else 'the second'} report")
            elif x["observed"] != y["observed"] or x["status"] != y["status"]:
                change = (f" ({y['observed'] - x['observed']:+.4g})" if _number(x["observed"]) and
                          _number(y["observed"]) else "")
                out.append(f"{name} {check}: {_shown(x['observed'])} -> {_shown(y['observed'])}{change}, "
                           f"{x['status']} -> {y['status']}")
    return out


def _shown(x: Any) -> str:
    return f"{x:.6g}" if _number(x) else str(x)


def record(report: dict, root: Path) -> tuple[Path, list[str]]:
    """Store the report's observed values as its suite's baselines: only from a report whose runs
    all completed; returns the file and the changes (old -> new) for the human to review."""
    failed = [r["name"] for r in report["runs"] if r["exit_code"] != 0 or r.get("error")]
    if failed:
        raise LauncherError(f"the report's run(s) {', '.join(failed)} failed: record a baseline from a report whose "
                            "runs all completed")
    # The suite (and so the baseline file) comes from the checked suite name alone, inside the
    # repository: never from a path the report names.
    suite = load_suite(suite_path(report["suite"], root), root)
    checks = {r.name: {c.name for c in r.checks if c.needs_baseline} for r in suite.runs}
    new = {k: dict(v) for k, v in suite.baselines.items()}
    changes = []
    for r in report["runs"]:
        for c in r["checks"]:
            if c["check"] in checks.get(r["name"], set()) and _number(c["observed"]):
                old = new.setdefault(r["name"], {}).get(c["check"])
                new[r["name"]][c["check"]] = c["observed"]
                if old != c["observed"]:
                    changes.append(f"{r['name']} {c['check']}: {_shown(old) if old is not None else 'none'} -> "
                                   f"{_shown(c['observed'])}")
    path = root / SUITES_DIR / BASELINES / f"{suite.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    head = (f"# Baselines of the regression suite {suite.name}: written by `mllm regress --record` from a report\n"
            f"# (commit {str(report['commit'])[:12]}, {report['target'].get('vm') or 'local'}, {report['started']}).\n"
            "# Review the diff and commit it: these are the values the next runs are judged against.\n")
    path.write_text(head + yaml.safe_dump(new, sort_keys=True))
    return path, changes


def _yaml(path: Path) -> Any:
    text = readback.read_local(path, REPORT_MAX_BYTES, str(path))
    if "\ufffd" in text:
        raise LauncherError(f"{path}: not UTF-8 text")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise LauncherError(f"{path}: not valid YAML ({readback.printable(str(e).splitlines()[0])})") from None


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _dirty(root: Path) -> bool | None:
    out = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                         capture_output=True, text=True)
    return bool(out.stdout.strip()) if out.returncode == 0 else None
