"""The launcher as a library: a `Cluster` (the selected workers of a READY TPU VM, or this
machine) and a `Run` on it. The `mllm` commands are thin wrappers over these; a script, a
recovery supervisor or a regression suite drives the same calls:

    with Cluster.connect("my-v6e", zone="us-east1-d") as c:
        run = c.launch("nanogpt", "configs/nanogpt/v6e8.yaml", ["train.max_steps=100"])
        code = run.wait()                       # streams the `[wK]` logs until the job ends
        summary, entry = run.fetch_summary(Path("runs"))

Output meant for the user (sync results, `[wK]` lines) is printed with `ssh.emit`, as the
commands show it; results are returned.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher import access, cloud, jobs, preflight, remote, runs, ssh, state, sync
from launcher.errors import LauncherError
from mllm_jax import contracts
from mllm_jax.config import ConfigError, check_keys


class NothingToResume(LauncherError):
    """`--resume` of a run with no complete checkpoint where its checkpoints go."""


@dataclass
class Cluster:
    """Where runs happen. `targets` are the selected workers (or this machine); for a VM,
    `workers` are all of its workers and `conns` one SSH connection per worker, closed by
    `close()` (or the `with` block)."""

    targets: list[jobs.Target]
    vm: str | None = None
    zone: str | None = None
    workers: list[ssh.Worker] = field(default_factory=list)
    internal_ips: list[str] = field(default_factory=list)
    conns: ssh.Connections | None = None
    accelerator_type: str | None = None
    """The VM's type (e.g. v6e-8), for preflight; None for this machine."""
    project: str | None = None
    service_account: str | None = None
    """The service account the VM runs as (None: the project's default compute account)."""
    _home: str | None = field(default=None, repr=False)

    @classmethod
    def connect(cls, vm: str | None = None, zone: str | None = None, project: str | None = None,
                worker: str = "all", internal_ip: bool = False, user: str | None = None,
                ssh_proxy: str | None = None) -> Cluster:
        """A READY TPU VM's workers (`worker`: all, 0, 1,3), reached as `launcher.access` says
        (the key put in the node's metadata first if it is not there, host keys published or
        pinned, a proxy if one is set); `vm`/`zone`/`project` default to the remembered ones."""
        z = cloud.Zone.resolve(zone, project)
        name = cloud.check_name(state.resolve("vm", vm, "--vm"))
        node = z.get(name)
        if node.state.name != "READY":
            raise LauncherError(f"TPU VM {name} is {node.state.name}, not READY")
        workers = access.workers(z, node, internal_ip)
        selected = ssh.select_workers(workers, worker)
        how = access.login(z, node, user, ssh_proxy)
        state.remember(vm=name, zone=z.zone, project=z.project, ssh_proxy=ssh_proxy)
        conns = access.connections(node, how)
        targets: list[jobs.Target] = [jobs.RemoteTarget(conns, w) for w in selected]
        return cls(targets, name, z.zone, workers, cloud.worker_ips(node, internal=True), conns, node.accelerator_type,
                   z.project, node.service_account.email or None)

    @classmethod
    def local(cls, root: Path | None = None) -> Cluster:
        """This machine: runs under `root`/runs (default: the current directory)."""
        return cls([jobs.LocalTarget(root or Path.cwd())])

    @property
    def is_local(self) -> bool:
        return self.conns is None

    @property
    def selected(self) -> list[ssh.Worker]:
        return [t.worker for t in self.targets if isinstance(t, jobs.RemoteTarget)]

    def close(self) -> None:
        if self.conns is not None:
            self.conns.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _remote(self, what: str) -> ssh.Connections:
        if self.conns is None:
            raise LauncherError(f"{what} needs a TPU VM (--vm), not --local")
        return self.conns

    # -- the workers' code and environment ---------------------------------------------------

    def sync(self, ref: str = "HEAD", include_dirty: bool = False) -> str:
        """Make the repo on the selected workers hold exactly this commit; returns its sha."""
        conns = self._remote("sync")
        repo = sync.repo_root()
        sha = sync.resolve_commit(repo, ref, include_dirty)
        for r in sync.sync_all(conns, self.selected, repo, sha):
            ssh.emit(f"w{r.worker}", f"{r.sha[:12]} ({'full' if r.full else 'incremental'}, {r.bytes_sent:,} bytes, "
                                     f"{r.seconds:.2f}s)")
        return sha

    def bootstrap(self, options: remote.InstallOptions, python: str | None = None, sync_first: bool = True,
                  include_dirty: bool = False) -> dict[int, dict]:
        """Install the synced pyproject on every selected worker (or record `python`); prints
        `[wK] ready: ...` per worker."""
        conns = self._remote("bootstrap")
        if sync_first and not python:
            self.sync("HEAD", include_dirty)
        results = ssh.fan_out(self.selected, lambda w: remote.bootstrap(conns, w, options, python))
        for i, r in results.items():
            ssh.emit(f"w{i}", f"ready: {r['python']} ({remote.describe_bootstrap(r)})")
        return results

    def versions(self) -> tuple[dict, dict[int, dict], list[tuple[int, str]]]:
        """(laptop, per-worker versions, (worker, field) where a worker differs from the laptop)."""
        conns = self._remote("versions")
        found = ssh.fan_out(self.selected, lambda w: remote.versions(conns, w))
        laptop = remote.laptop_versions()
        return laptop, found, remote.mismatches(laptop, found)

    def worker_path(self, path: str) -> str:
        """A path on the workers with a leading `~/` made absolute with the login user's home
        (SFTP and the trainer's --env-file expand no `~`); other paths as they are."""
        if not path.startswith("~/"):
            return path
        if self._home is None:
            code, out = self.targets[0].sh('printf "MLLM_HOME %s\\n" "$HOME"')
            homes = [line[len("MLLM_HOME "):] for line in out.splitlines() if line.startswith("MLLM_HOME /")]
            if code or not homes:
                raise LauncherError(f"{self.targets[0].label}: cannot tell the login user's home ({out.strip()[-200:]})")
            self._home = homes[0].rstrip("/")
        return f"{self._home}/{path[2:]}"

    def push_env(self, src: Path, dest: str = contracts.ENV_ON_WORKER) -> list[str]:
        """Copy an env file to the selected workers over SFTP (0600); returns its key names."""
        conns = self._remote("env push")
        dest = self.worker_path(dest)
        content, names = remote.normalized_env(src)
        ssh.fan_out(self.selected, lambda w: remote.push_env(conns, w, content, dest))
        return names

    def exec(self, argv: list[str], env_file: str | None = None, fail_fast: bool = False) -> int:
        """Run argv (quoted, never re-split) on the selected workers; the worst exit code."""
        conns = self._remote("exec")
        command = shlex.join(argv)
        if env_file:  # parsed as dotenv by the trainer's own reader (the synced repo's, else the
            # interpreter's installed mllm_jax), never sourced as shell
            repo = jobs.RemoteTarget(conns, self.selected[0]).repo
            command = (f"cd {repo} 2>/dev/null || cd; exec {remote.remote_python()} -m mllm_jax env-exec {shlex.quote(env_file)} "
                       f"-- sh -c 'cd && exec \"$@\"' sh {command}")
        return ssh.exec_all(conns, self.selected, command, fail_fast=fail_fast)

    # -- runs ----------------------------------------------------------------------------------

    def launch(self, recipe: str, config: str, overrides: list[str] = (), env_file: str | None = None,
               sync_first: bool = True, include_dirty: bool = False, force: bool = False,
               run_preflight: bool = True, resume: str | None = None, bucket: str | None = None,
               recoveries: int = 0, resume_if_any: bool = False, durable: bool = False,
               allow_config_change: tuple[str, ...] = ()) -> Run:
        """Start `python -m mllm_jax train RECIPE` detached, one process per selected worker
        (coordinator = the first), after syncing and bringing each venv up to date. On a VM the
        config is first compiled for its TPU type (preflight) and refused if it cannot fit,
        before any worker is touched. Nothing half-started: a failed start stops the processes
        already started.

        `resume` (a run id, or "latest"): continue that run from its latest complete checkpoint
        with the same run id (same run dir, W&B run and metrics.jsonl); refused in one line when
        it has no checkpoint.

        `bucket` (gs://NAME[/PREFIX]): unless the config names `train.checkpoint_dir`, the run's
        checkpoints go to BUCKET/<run id>/checkpoints, which every worker shares and which
        outlives the VM (what `mllm watch` needs to recover it). `recoveries`: the supervisor's
        count, for run_summary.json; `resume_if_any`: its relaunch, from step 0 when the run was
        preempted before its first checkpoint. `durable`: refuse (before anything starts) a run
        whose checkpoints would be on the VM's own disk, which a preemption loses (`--recover`).
        `allow_config_change`: with `resume`, settings that may differ from the checkpoint's.

        On a VM the launch is recorded in .mllm/watch/<run id>.json for `mllm watch`."""
        config_arg, sha = self._config_and_sha(config)
        resolved = check_config(recipe, config, list(overrides))
        try:
            check_keys(resolved, allow_config_change, "--allow-config-change")
        except ConfigError as e:
            raise LauncherError(str(e)) from None
        if not self.is_local:
            check_worker_paths(resolved)
        own_dir = (resolved.get("train") or {}).get("checkpoint_dir")
        if own_dir:
            bucket = None  # the config's own directory wins
        elif bucket:
            bucket = check_bucket(bucket)
        if durable and not self.is_local:
            from launcher import watch

            watch.check_durable(own_dir or (bucket_checkpoints(bucket, "<run id>") if bucket else None))
        if run_preflight and self.accelerator_type:
            preflight.gate(recipe, config, list(overrides), self.accelerator_type)
        if resume and resume_if_any:  # the supervisor's relaunch: the trainer decides (no checkpoint: step 0)
            jobs.run_path(resume)
            resumed: str | None = resume
        else:
            resumed = self._resumable(resume, resolved, bucket) if resume else None  # before anything changes there
        if not self.is_local:
            sha = self.sync("HEAD", include_dirty) if sync_first else "nosync"
        busy = sorted({r for t in self.targets for r in jobs.running_jobs(t)})
        if busy and not force:
            raise LauncherError(f"a job is still running there ({', '.join(busy)}): `mllm stop` it or pass --force")
        for run_id in busy:
            for t in self.targets:
                ssh.emit(t.label, f"stopping {run_id}: {jobs.stop(t, run_id)}")
        if env_file is None and not self.is_local:
            default_env = self.worker_path(contracts.ENV_ON_WORKER)
            env_file = default_env if self.targets[0].sh(f"test -f {shlex.quote(default_env)}")[0] == 0 else None
        if self.conns is not None:
            conns = self.conns
            ssh.fan_out(self.selected, lambda w: remote.refresh(conns, w))
        self._check_same_jax()
        if bucket:  # worker 0 writes it as the job will, before anything starts (a --local run: this machine)
            remote.probe_bucket(self.targets[0], bucket, env_file, self.service_account)
        run_id = resumed or contracts.run_id(recipe, sha)
        if bucket:
            overrides = [*overrides, f"train.checkpoint_dir={bucket_checkpoints(bucket, run_id)}"]
        coordinator = (f"{self.internal_ips[self.targets[0].index]}:{contracts.COORDINATOR_PORT}"
                       if not self.is_local else None)
        spec = jobs.LaunchSpec(recipe, config_arg, list(overrides), run_id, env_file, coordinator, len(self.targets),
                               resume=bool(resume), resume_if_any=resume_if_any, recoveries=recoveries,
                               allow_config_change=allow_config_change)
        started: list[jobs.Target] = []
        try:
            for process_id, t in enumerate(self.targets):
                jobs.start(t, spec, process_id)
                started.append(t)
                ssh.emit(t.label, f"started {run_id} (process {process_id} of {len(self.targets)})")
        except LauncherError:  # the others would wait for the missing one forever
            for t in started:
                ssh.emit(t.label, f"stopping {run_id}: {jobs.stop(t, run_id, grace=5)}")
            raise
        if not self.is_local:
            if sha == "nosync":
                sha = _checked_head(self.targets[0])
            from launcher import watch

            # How the workers were bootstrapped, now, while they answer: a VM preempted right after
            # the launch must still be created again the same way.
            boot = remote.bootstrap_record(self.conns, self.workers[0]) if self.conns is not None else None
            watch.record_launch(run_id, recipe, config_arg, list(overrides), sha, self.vm, self.zone, self.project,
                                env_file, boot, own_dir or (bucket_checkpoints(bucket, run_id) if bucket else None))
        return Run(self, run_id)

    def _resumable(self, resume: str, resolved: dict, bucket: str | None) -> str:
        """The run id `resume` names ("latest": the first target's runs/latest), after checking
        that the run is there and, when its checkpoints are on the workers' disks, that one is
        complete. A bucket directory is the trainer's to check (it refuses in one line). A run whose
        checkpoints outlive the VM (a bucket, or a shared mount outside the run dir) may come
        back on a new VM, without a run dir yet."""
        t = self.targets[0]
        run_id = jobs.latest_run(t) if resume == contracts.LATEST else resume
        run = jobs.run_path(run_id)
        directory = ((resolved.get("train") or {}).get("checkpoint_dir")
                     or (bucket_checkpoints(bucket, run_id) if bucket else f"{run}/{contracts.CHECKPOINTS_DIR}"))
        if "://" in directory:
            return run_id
        if not directory.startswith("/") and t.sh(f"test -d {t.repo}/{run}")[0]:
            raise LauncherError(f"--resume {resume}: no run {run_id} on {t.label}")
        if not jobs.checkpoint_steps(t, directory):
            raise NothingToResume(f"--resume {resume}: run {run_id} has no complete checkpoint in {directory} on "
                                f"{t.label}; nothing to resume (launch it afresh)")
        return run_id

    def run(self, run_id: str | None = None) -> Run:
        """A run on this cluster by id; None = the first target's runs/latest."""
        if run_id is not None:
            jobs.run_path(run_id)  # one safe path component, or a one-line error
        return Run(self, run_id or jobs.latest_run(self.targets[0]))

    def _config_and_sha(self, config: str) -> tuple[str, str]:
        """The config as the trainer will be given it, and the commit a local run reports."""
        if self.is_local:
            if not Path(config).is_file():
                raise LauncherError(f"--config {config}: file not found")
            return config, sync.head_or_none() or "nogit"
        root = sync.repo_root()
        path = Path(config).resolve()
        if not path.is_file() or not path.is_relative_to(root):
            raise LauncherError(f"--config {config}: expected a file inside the repository {root} (it is synced)")
        return str(path.relative_to(root)), ""

    def _check_same_jax(self) -> None:
        """Every target imports jax and mllm_jax from the repo, with worker 0's jax: mixed
        versions hang jax.distributed."""
        found = ssh.fan_out(self.targets, _importable_jax)
        first = self.targets[0]
        for t in self.targets[1:]:
            if found[t.index] != found[first.index]:
                raise LauncherError(f"{t.label} has jax {found[t.index]} but {first.label} has "
                                    f"{found[first.index]}: mixed versions hang jax.distributed; run `mllm bootstrap`")


def check_config(recipe: str, config: str, overrides: list[str]) -> dict:
    """Refuse a bad recipe, config file or `--set` item on the laptop, before any VM is touched:
    the trainer's own loader resolves the config (`--print-config`, in a child process: the
    recipe modules import JAX, the launcher does not). Returns the resolved config."""
    from mllm_jax.recipes import RECIPES

    if recipe not in RECIPES:
        raise LauncherError(f"RECIPE {recipe!r}: unknown; expected one of {', '.join(RECIPES)}")
    for item in overrides:
        if contracts.control_chars(item):
            raise LauncherError(f"--set {item!r}: control characters ({', '.join(contracts.control_chars(item))}) "
                                "are not allowed; give one KEY=VALUE per --set")
    argv = [sys.executable, "-m", "mllm_jax", "train", recipe, "--config", str(Path(config).absolute()), "--print-config"]
    for item in overrides:
        argv += ["--set", item]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(argv, capture_output=True, text=True, env=env)  # here: relative paths mean what the run sees
    if out.returncode:
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        error = next((line for line in reversed(lines) if line.startswith("error: ")), lines[-1] if lines else "")
        raise LauncherError(f"--config {config}: {error.removeprefix('error: ')}")
    return yaml.safe_load(out.stdout) or {}


_INPUT_KEY = re.compile(r"(^|_)(path|file)$|^base_model$")
"""Config keys that name something the job reads (data, an index, a model directory)."""


def check_worker_paths(resolved: dict, where: str = "") -> None:
    """Refuse a relative input path that leaves the repository: the job runs in the synced repo
    on each worker, where `../shared/data` (a path that works on this laptop) does not exist."""
    for key, value in resolved.items():
        name = f"{where}{key}"
        if isinstance(value, dict):
            check_worker_paths(value, f"{name}.")
        elif (isinstance(value, str) and _INPUT_KEY.search(str(key)) and "://" not in value
              and not value.startswith("/") and os.path.normpath(value).split(os.sep)[0] == ".."):
            raise LauncherError(f"{name} {value!r}: a relative path outside the repository, which is not synced to "
                                "the workers (they run in their copy of it); give the path on the workers as an "
                                "absolute one, or put the file under the repository")


_BUCKET = re.compile(r"^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/[A-Za-z0-9._/-]*)?$")


def check_bucket(url: str) -> str:
    """A gs:// bucket (and prefix) for checkpoints, without a trailing slash; one line if not."""
    if not _BUCKET.match(url) or "//" in url[5:] or ".." in url:
        raise LauncherError(f"--bucket {url!r}: expected gs://BUCKET or gs://BUCKET/PREFIX (lowercase bucket name; "
                            "letters, digits, '.', '_', '-' and '/' in the prefix)")
    return url.rstrip("/")


def bucket_checkpoints(bucket: str, run_id: str) -> str:
    """Where `--bucket` puts a run's checkpoints."""
    return f"{bucket}/{run_id}/{contracts.CHECKPOINTS_DIR}"


def _checked_head(t: jobs.Target) -> str:
    """The commit checked out on a worker (a launch with --no-sync ran it)."""
    code, out = t.sh(f"git -C {t.repo} rev-parse HEAD")
    return out.strip() if code == 0 else "unknown"


def _importable_jax(t: jobs.Target) -> str:
    code, out = t.sh(f"cd {t.repo} && {t.python} -c 'import importlib.metadata as m; "
                     f"print(\"MLLM_JAX\", m.version(\"jax\"), flush=True); import jax, mllm_jax'")
    found = [line.split()[1] for line in out.splitlines() if line.startswith("MLLM_JAX ")]
    if code:
        raise LauncherError(f"{t.label}: cannot import jax and mllm_jax there ({out.strip()[-200:]}); run `mllm bootstrap`")
    return found[0]


@dataclass
class Run:
    """One run on a cluster, by id."""

    cluster: Cluster
    id: str

    @property
    def targets(self) -> list[jobs.Target]:
        return self.cluster.targets

    def status(self) -> dict[int, jobs.WorkerStatus]:
        return ssh.fan_out(self.targets, lambda t: jobs.status(t, self.id))

    def logs(self, follow: bool = False, raw: bool = False) -> int | None:
        """Print every target's log, `[wK]`-prefixed. `follow` streams until the job ends (its
        exit file exists) and returns the worst exit code (1 for a worker whose job is gone
        without one). A connection that drops or goes silent is reported as `[wK] connection lost
        (why), reconnecting` and opened afresh (with backoff), from the first line not printed
        yet: each line is printed once. Terminal escapes in the log are shown escaped unless `raw`."""
        if not follow:
            for t in self.targets:
                for line in jobs.read_log(t, self.id).splitlines():
                    ssh.emit(t.label, line, raw)
            return None
        if len(self.targets) > 1:
            codes = list(ssh.fan_out(self.targets, lambda t: self._follow(t, raw)).values())
        else:  # in this thread: Ctrl-C stops it at once
            codes = [self._follow(self.targets[0], raw)]
        return max((c if c is not None else 1) for c in codes)

    def _follow(self, t: jobs.Target, raw: bool = False) -> int | None:
        """One target's log until its job ends: its exit code, None if it is lost."""
        seen = 0

        def line(text: str) -> None:
            nonlocal seen
            seen += 1
            ssh.emit(t.label, text, raw)

        delay, tries = 1.0, 0
        while True:
            before = seen
            try:
                code = jobs.follow(t, self.id, line, from_line=seen + 1, until_exit=True)
            except (ssh.ConnectionLost, *ssh.TRANSPORT_ERRORS) as e:
                why = str(e) or type(e).__name__
            else:
                if code is None:
                    ssh.emit(t.label, f"the job is not running and recorded no exit code (status lost); "
                                      f"stopped following {self.id}")
                return code
            if seen > before:  # it got somewhere: start the backoff over
                delay, tries = 1.0, 0
            tries += 1
            if tries > 8:
                raise LauncherError(f"{t.label}: connection lost ({why}), and {tries - 1} reconnections failed; "
                                    f"the job may still be running (`mllm status`)")
            ssh.emit(t.label, f"connection lost ({why}), reconnecting")
            time.sleep(delay)
            delay = min(delay * 2, 30.0)

    def exit_code(self) -> int:
        """The worst target's exit code (1 for a target that wrote none)."""
        codes = [jobs.exit_code(t, self.id) for t in self.targets]
        return max((c if c is not None else 1) for c in codes)

    def wait(self) -> int:
        """Stream the logs until the job ends; its exit code."""
        code = self.logs(follow=True)
        return self.exit_code() if code is None else code

    def stop(self, grace: float = contracts.STOP_GRACE_SEC) -> dict[int, str]:
        return ssh.fan_out(self.targets, lambda t: jobs.stop(t, self.id, grace))

    def fetch_summary(self, dest: Path = Path(contracts.RUNS_DIR)) -> tuple[dict[str, Any], dict[str, Any]]:
        """Bring run_summary.json (and config, metrics) home under dest/<run id>/ and index the
        run; (summary, index entry). A local run's files are already here."""
        c = self.cluster
        if c.is_local:
            dest = Path(contracts.RUNS_DIR)
            summary = runs.read_local(self.id, dest)
        else:
            summary = runs.fetch(self.targets[0], self.id, dest)
        return summary, runs.record(self.id, summary, c.vm, c.zone, dest)
