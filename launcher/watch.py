"""The recovery supervisor behind `mllm watch RUN` and `mllm launch --recover`.

A spot TPU VM that is preempted cannot be restarted: it must be deleted and created again, and its
disks are gone. The supervisor looks at the run's VM (through the Cloud TPU API) and at its job
(over SSH) every `poll` seconds. When the node is PREEMPTED or gone, its queued resource SUSPENDED
or FAILED, or the workers stay unreachable past `unreachable_after`, it deletes what is left,
creates the VM again with the same spec (backing off while capacity is short), bootstraps it the
way the old one was bootstrapped, syncs the run's own commit, pushes the env file again and
relaunches with `--resume` (the checkpoints must be on a bucket: `mllm launch --bucket`). A job
that lost its process on a live VM is resumed in place. Each recovery is counted (in the plan, the
run index and, through $MLLM_RECOVERIES, run_summary.json) and bounded by `max_recoveries`.

A job that exits non-zero by itself is a bug, not a preemption: it ends the watch unless
`restart_on_failure`. When the run ends (or recovery gives up) the VM and its queued resource are
deleted if `mllm` made them (`mllm vm create` from here, or a recreate), so nothing is left
holding quota; a VM the run only attached to is kept unless `--delete-vm` (`keep_vm` False), and
so is a stopped run's (`mllm stop`: it can go on from its checkpoint there). A supervisor killed
mid-recovery and started again goes on with that recovery without counting it twice.

The API and SSH have bad minutes: an error that persists makes the look "unknown" (a line when
that starts and ends), never the end of the watch; past `api_grace` it counts as unreachable.
A queued resource still waiting when `create_timeout` runs out keeps its place in the queue.

State lives in `.mllm/watch/<run id>.json` (the plan, rewritten at each change), so a supervisor
that is killed and started again picks the run up where it was; a lock file makes a second
supervisor of the same run refuse to start.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from launcher import access, cloud, jobs, keys, remote, runs, ssh, state
from launcher.errors import LauncherError
from mllm_jax import contracts

WATCH_DIR = "watch"
"""Under the state dir: <run id>.json (plan), .lock (held by the live supervisor), .log (--detach)."""
DEAD_NODE_STATES = ("PREEMPTED", "TERMINATED", "STOPPED")
DEAD_QUEUED = ("SUSPENDING", "SUSPENDED", "FAILED")
CREATE_ATTEMPTS = 6
"""Tries at creating the VM again in one recovery (with doubling backoff) before giving up."""
ENDED = ("completed", "failed", "stopped", "gave up")
"""A plan's final statuses: its VM is gone, there is nothing left to watch."""
EVENTS_KEPT = 200
KEPT = ("env_src", "vm_request", "bootstrap", "max_recoveries", "restart_on_failure", "keep_vm", "recoveries",
        "restarts", "events", "owned", "allow_restart_from_zero")
"""What a new launch of a watched run (its resume) keeps of the old plan."""


class Unrecoverable(LauncherError):
    """A recovery that cannot work by trying again: the watch ends, as failed."""


@dataclass
class Plan:
    """What the supervisor needs to bring a run back, without the dead VM: recorded by `mllm
    launch` (the launch) and completed by the first look at the live VM (its spec, bootstrap)."""

    run: str
    recipe: str
    config: str
    overrides: list[str]
    commit: str
    vm: str
    zone: str
    project: str
    env_file: str | None = None
    """The env file on the workers (the trainer's --env-file)."""
    env_src: str | None = None
    """A file on this machine to push there again after a recreate (its path, never its content)."""
    vm_request: dict[str, Any] | None = None
    """`cloud.VmRequest` fields of the VM to create again (valid_for is not kept)."""
    bootstrap: dict[str, Any] | None = None
    """{"python": PATH} (an existing interpreter) or {"options": InstallOptions fields}."""
    max_recoveries: int = 3
    restart_on_failure: bool = False
    keep_vm: bool | None = None
    """Keep the VM at the end (True), delete it (False), or delete it only if `owned` (None)."""
    owned: bool = False
    """`mllm` made this VM (`mllm vm create` from here, or the supervisor's recreate)."""
    checkpoints: str | None = None
    """Where the run's checkpoints go (None: its run dir on the VM), as the launch resolved it."""
    allow_restart_from_zero: bool = False
    """Supervise it although its checkpoints die with the VM (a recovery then starts over)."""
    checkpoint: int | None = None
    """The latest complete checkpoint the supervisor has seen the job report: from then on a
    relaunch must resume (`--resume`), and one that finds no checkpoint fails the run."""
    recoveries: int = 0
    restarts: int = 0
    status: str = "watching"
    events: list[str] = field(default_factory=list)


def _dir() -> Path:
    return state.STATE_DIR / WATCH_DIR


def plan_path(run_id: str) -> Path:
    return _dir() / f"{run_id}.json"


def log_path(run_id: str) -> Path:
    return _dir() / f"{run_id}.log"


def save(plan: Plan) -> None:
    """Write the plan whole or not at all (a kill mid-write keeps the old one)."""
    state.ensure_dir()
    _dir().mkdir(exist_ok=True)
    tmp = plan_path(plan.run).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(plan), indent=2) + "\n")
    tmp.replace(plan_path(plan.run))


def load(run_id: str) -> Plan:
    """The run's plan; a run `mllm launch` did not record is a one-line error."""
    if not contracts.is_run_id(run_id):
        raise LauncherError(f"RUN {run_id!r}: expected a run id (letters, digits, '.', '_' or '-')")
    path = plan_path(run_id)
    data = state.read_json_object(path)
    if not data:
        raise LauncherError(f"RUN {run_id}: no launch of it is recorded in {path} (launch it with `mllm launch` "
                            "from this directory first)")
    try:
        return Plan(**data)
    except TypeError as e:
        raise LauncherError(f"{path}: not a watch plan ({e}); fix or delete it") from None


VM_DISK = ("/root", "/home/", "/tmp", "/var/tmp")
"""Absolute paths on a worker's own disk: gone with a preempted VM (other absolute paths are
taken as a mount the user made, e.g. Filestore)."""


def durable(checkpoints: str | None) -> bool:
    """Whether checkpoints there outlive the VM (a bucket, or an absolute path off its disk)."""
    return checkpoints is not None and ("://" in checkpoints
                                        or (checkpoints.startswith("/") and not checkpoints.startswith(VM_DISK)))


def check_durable(checkpoints: str | None) -> None:
    """Refuse to supervise a run whose checkpoints die with the VM: its "recovery" would train
    from step 0 again and call that a success."""
    if not durable(checkpoints):
        where = f"in {checkpoints}" if checkpoints else f"in the run dir ({contracts.RUNS_DIR}/<run id>/checkpoints)"
        raise LauncherError(f"the run's checkpoints would be {where}, on the VM's own disk, which a preemption "
                            "loses: give --bucket gs://BUCKET (or a train.checkpoint_dir on shared storage), or "
                            "--allow-restart-from-zero to recover by starting over")


def record_launch(run_id: str, recipe: str, config: str, overrides: list[str], commit: str, vm: str, zone: str,
                  project: str, env_file: str | None, bootstrap: dict[str, Any] | None = None,
                  checkpoints: str | None = None) -> None:
    """What `mllm launch` started (and how its workers were bootstrapped), for a later `mllm watch
    RUN`; a plan already there (a resume of a watched run) keeps its counts and choices."""
    old = state.read_json_object(plan_path(run_id))
    plan = Plan(run_id, recipe, config, list(overrides), commit, vm, zone, project, env_file, bootstrap=bootstrap,
                owned=state.created(project, zone, vm), checkpoints=checkpoints)
    if old:  # keep the counts and options; what was learned about the VM only if it is the same one
        same_vm = (old.get("vm"), old.get("zone"), old.get("project")) == (vm, zone, project)
        plan = Plan(**{**old, **asdict(plan), **{k: old.get(k) for k in KEPT if k in old},
                       **({} if same_vm else {"vm_request": None, "bootstrap": None, "owned": plan.owned}),
                       "status": "launched"})
        plan.bootstrap = bootstrap or plan.bootstrap
        plan.owned = plan.owned or state.created(project, zone, vm)
    save(plan)


class Lock:
    """`.mllm/watch/<run>.lock`, held (flock) for the supervisor's life; the kernel drops it when
    the process dies, however it dies."""

    def __init__(self, run_id: str):
        state.ensure_dir()
        _dir().mkdir(exist_ok=True)
        self.path = _dir() / f"{run_id}.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 32).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise LauncherError(f"run {run_id} is already watched (pid {holder}, log {log_path(run_id)}); "
                                f"stop that supervisor first") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())

    def release(self) -> None:
        os.close(self.fd)


def detach(run_id: str, argv: list[str]) -> int:
    """Start `mllm watch` with `argv` in its own session, logging to `.mllm/watch/<run>.log`, so it
    outlives this terminal; returns its pid once it holds the run's lock (or its error)."""
    load(run_id)
    Lock(run_id).release()  # refuse now, in the foreground, when one is already running
    log = log_path(run_id)
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-c", "from launcher.cli import run; run()", *argv],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if (_dir() / f"{run_id}.lock").read_text().strip() == str(proc.pid):
                return proc.pid
        except OSError:
            pass
        time.sleep(0.1)
    if proc.poll() is not None:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise LauncherError(f"the supervisor exited at once ({proc.returncode}): {tail[0]}")
    return proc.pid


def say(plan: Plan, text: str, save_it: bool = True) -> None:
    """One supervisor line: printed (`[watch]`) and kept in the plan's events."""
    line = f"{time.strftime('%H:%M:%S')} {text}"
    ssh.emit("watch", line)
    plan.events = [*plan.events[-(EVENTS_KEPT - 1):], line]
    if save_it:
        save(plan)


# -- looking at the VM and the job ------------------------------------------------------------------

@dataclass
class Look:
    kind: str
    """running | done | failed | stopped | lost | dead | unreachable | unknown (the API failing)"""
    why: str = ""
    code: int = 0
    checkpoint: int | None = None
    """The latest complete checkpoint the job reported (see Plan.checkpoint)."""


def look(z: cloud.Zone, plan: Plan, connect: Callable[[], Any]) -> Look:
    """What the VM and the job are doing now. The API is asked before and again after SSH: a VM
    being preempted can still answer for a moment, and its dying job then means nothing. An API
    that fails even after its retries makes the look "unknown"."""
    try:
        return _look(z, plan, connect)
    except LauncherError as e:
        return Look("unknown", str(e))


def _look(z: cloud.Zone, plan: Plan, connect: Callable[[], Any]) -> Look:
    seen = _look_vm(z, plan)
    if seen is not None:
        return seen
    seen = _look_job(plan, connect)
    if seen.kind in ("running", "done", "stopped"):
        return seen
    return _look_vm(z, plan) or seen


def _look_vm(z: cloud.Zone, plan: Plan) -> Look | None:
    """A dead or not-ready VM (None: READY)."""
    qr = z.find_queued(plan.vm)
    if qr is not None and cloud.queued_state(qr) in DEAD_QUEUED:
        return Look("dead", f"its queued resource is {cloud.queued_state(qr)}")
    node = z.find(plan.vm)
    if node is None:
        return Look("dead", "the VM is gone")
    if node.state.name in DEAD_NODE_STATES:
        return Look("dead", f"the VM is {node.state.name}")
    if node.state.name != "READY":
        return Look("unreachable", f"the VM is {node.state.name}")
    return None


def _look_job(plan: Plan, connect: Callable[[], Any]) -> Look:
    try:
        with connect() as c:
            found = c.run(plan.run).status()
    except (LauncherError, ssh.ConnectionLost, *ssh.TRANSPORT_ERRORS) as e:
        return Look("unreachable", str(e) or type(e).__name__)
    checkpoint = max((s.checkpoint for s in found.values() if s.checkpoint is not None), default=None)
    return replace(_job_look(found), checkpoint=checkpoint)


def _job_look(found: dict[int, jobs.WorkerStatus]) -> Look:
    states = [s.state for s in found.values()]
    if all(s == "running" for s in states):
        return Look("running")
    codes = {w: int(s.state.split()[1]) for w, s in found.items() if s.state.startswith("exited")}
    failed = {w: c for w, c in codes.items() if c not in (0, contracts.EXIT_STOPPED)}
    if failed:
        w = max(failed, key=lambda k: (failed[k], -k))
        return Look("failed", f"the job exited {failed[w]} on w{w} ({found[w].last_line.strip()[-300:]})", failed[w])
    if "lost" in states or "missing" in states:
        return Look("lost", "the job is " + ("gone without an exit code" if "lost" in states else "not on the VM"))
    if "running" in states:
        return Look("running")
    if codes and all(c == 0 for c in codes.values()):
        return Look("done")
    return Look("stopped", "the job was stopped (exit 143)", contracts.EXIT_STOPPED)


# -- the loop ------------------------------------------------------------------------------------

ENV_TIMING = {"poll": "MLLM_WATCH_POLL", "unreachable_after": "MLLM_WATCH_UNREACHABLE_AFTER",
              "backoff": "MLLM_WATCH_BACKOFF", "api_grace": "MLLM_WATCH_API_GRACE",
              "create_timeout": "MLLM_WATCH_CREATE_TIMEOUT"}
"""Environment variables for `Timing`'s fields, used where no flag sets them (`mllm launch --recover`)."""


@dataclass
class Timing:
    poll: float = 30.0
    unreachable_after: float = 600.0
    """Seconds the workers of a READY VM may stay unreachable before it counts as dead."""
    backoff: float = 60.0
    """First wait after a failed create (doubling, at most 30 minutes)."""
    create_timeout: float = 3600.0
    """Seconds one create may take (a queued resource still waiting then keeps its place)."""
    api_grace: float = 900.0
    """Seconds the API may keep failing (after its retries) before the VM counts as unreachable."""

    @classmethod
    def resolve(cls, **given: float | None) -> "Timing":
        """The flags given, else $MLLM_WATCH_*, else the defaults."""
        values: dict[str, float] = {}
        for key, env in ENV_TIMING.items():
            value, text = given.get(key), os.environ.get(env, "").strip()
            if value is None and text:
                try:
                    value = float(text)
                except ValueError:
                    value = -1.0
                if not 0 <= value < float("inf"):
                    raise LauncherError(f"${env}={text!r}: expected seconds (a number >= 0)")
            if value is not None:
                values[key] = value
        return cls(**values)


def watch(run_id: str, timing: Timing = Timing()) -> int:
    """Supervise the run until it ends; the exit code: 0 completed, the job's code when it
    failed by itself (or was stopped), 1 when recovery gave up."""
    from launcher.cluster import Cluster

    plan = load(run_id)
    if plan.status in ENDED:
        raise LauncherError(f"run {run_id} already ended ({plan.status}; {plan_path(run_id)}); to go on, "
                            f"`mllm launch ... --resume {run_id}` on a VM, then watch it again")
    if not plan.allow_restart_from_zero:
        check_durable(plan.checkpoints)
    lock = Lock(run_id)
    try:
        z = cloud.Zone.resolve(plan.zone, plan.project)
        connect = lambda: Cluster.connect(plan.vm, plan.zone, plan.project)  # noqa: E731
        if plan.status != "recovering":
            plan.status = "watching"
        say(plan, f"watching {run_id} on {plan.vm} ({plan.zone}); {plan.recoveries}/{plan.max_recoveries} "
                  "recoveries used")
        _complete(plan, z, connect)
        if plan.env_file and not plan.env_src:
            say(plan, f"note: the job reads {plan.env_file} on the workers, which a VM created again will not have; "
                      "watch with --push-env FILE to push it there again")
        unreachable_since: float | None = None
        unknown_since: float | None = None
        # A supervisor killed mid-recovery left the plan "recovering": the next one finishes that
        # recovery without counting the same preemption twice.
        resuming = plan.status == "recovering"
        while True:
            seen = look(z, plan, connect)
            if seen.kind == "unknown":
                if unknown_since is None:
                    say(plan, f"cannot tell how the run is ({seen.why}); still watching")
                unknown_since = unknown_since or time.monotonic()
                if time.monotonic() - unknown_since < timing.api_grace:
                    time.sleep(timing.poll)
                    continue
                seen = Look("unreachable", f"the API has failed for {time.monotonic() - unknown_since:.0f}s ({seen.why})")
            elif unknown_since is not None:
                say(plan, f"the API answers again after {time.monotonic() - unknown_since:.0f}s")
                unknown_since = None
            if seen.kind == "unreachable":
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since < timing.unreachable_after:
                    time.sleep(timing.poll)
                    continue
                seen = Look("dead", f"the workers have been unreachable for "
                                    f"{time.monotonic() - unreachable_since:.0f}s ({seen.why})")
            unreachable_since = None
            if seen.checkpoint is not None and seen.checkpoint > (plan.checkpoint or -1):
                plan.checkpoint = seen.checkpoint
                save(plan)
            if seen.kind == "running":
                resuming = False
                if plan.status != "watching":
                    plan.status = "watching"
                    save(plan)
                time.sleep(timing.poll)
                continue
            if seen.kind == "done":
                return _finish(plan, z, connect, "completed", 0, timing)
            if seen.kind == "stopped":
                return _finish(plan, z, connect, "stopped", seen.code, timing)
            if seen.kind == "failed" and not plan.restart_on_failure:
                say(plan, f"{seen.why}: a failure, not a preemption (pass --restart-on-failure to resume it anyway)")
                return _finish(plan, z, connect, "failed", seen.code, timing)
            counter = "restarts" if seen.kind == "failed" else "recoveries"
            if resuming:
                resuming = False
                say(plan, f"{seen.why}: going on with recovery {plan.recoveries + plan.restarts}/"
                          f"{plan.max_recoveries}, which a supervisor before this one began")
            else:
                if plan.recoveries + plan.restarts >= plan.max_recoveries:
                    say(plan, f"{seen.why}; {plan.max_recoveries} recoveries used up: giving up")
                    return _finish(plan, z, connect, "gave up", 1, timing, fetch=seen.kind != "dead")
                setattr(plan, counter, getattr(plan, counter) + 1)
                plan.status = "recovering"
                say(plan, f"{seen.why}: recovery {plan.recoveries + plan.restarts}/{plan.max_recoveries}")
            runs.mark(plan.run, vm=plan.vm, zone=plan.zone, recipe=plan.recipe, commit=plan.commit,
                      status="recovering", recoveries=plan.recoveries)
            try:
                if seen.kind == "dead":
                    _recreate(plan, z, timing)
                _relaunch(plan, connect)
            except Unrecoverable as e:
                say(plan, f"recovery {plan.recoveries + plan.restarts} failed: {e}")
                return _finish(plan, z, connect, "failed", 1, timing, fetch=False)
            except (LauncherError, ssh.ConnectionLost, *ssh.TRANSPORT_ERRORS) as e:
                say(plan, f"recovery {plan.recoveries + plan.restarts} failed: {e}")  # the next look decides
                time.sleep(timing.poll)
            except Exception as e:  # noqa: BLE001 - a supervisor that dies leaves a spot run unsupervised
                say(plan, f"recovery {plan.recoveries + plan.restarts} failed unexpectedly: {type(e).__name__}: {e}")
                time.sleep(timing.poll)
    finally:
        lock.release()


def _complete(plan: Plan, z: cloud.Zone, connect: Callable[[], Any]) -> None:
    """Learn, from the live VM, what recreating it needs: its spec and how it was bootstrapped."""
    if plan.vm_request is None:  # a node that is already PREEMPTED still says what it was
        node = z.find(plan.vm)
        if node is None:
            raise LauncherError(f"TPU VM {plan.vm} is gone: the supervisor must first see it to learn how to "
                                "create it again")
        plan.vm_request = cloud.VmRequest.of_node(node, z.find_queued(plan.vm)).record()
        save(plan)
    if plan.bootstrap is None:
        with connect() as c:
            plan.bootstrap = remote.bootstrap_record(c.conns, c.workers[0])
        save(plan)


def _recreate(plan: Plan, z: cloud.Zone, timing: Timing) -> None:
    """Delete what is left of the VM, then create it again with the same spec; capacity errors
    back off and try again (CREATE_ATTEMPTS in all). A queued resource of ours still in the queue
    is waited for, never deleted and queued again: that would lose its place."""
    req = cloud.VmRequest.from_record(plan.vm_request)
    delay, attempt = timing.backoff, 0
    while True:
        qr = z.find_queued(plan.vm) if req.queued else None
        try:
            if qr is not None and cloud.queued_state(qr) in cloud.WAITING_QUEUED_STATES:
                cloud.wait_queued(z, plan.vm, timing.create_timeout, poll=min(timing.poll, 10.0))
            else:
                _delete(plan, z, timing)
                attempt += 1
                say(plan, f"creating {plan.vm} again ({req.accelerator_type}, {req.capacity}"
                          f"{', queued' if req.queued else ''}), attempt {attempt}")
                z.create_vm(req, keys.ensure_key()[1], timing.create_timeout, poll=min(timing.poll, 10.0),
                            on_accepted=lambda: _owned(plan))
            plan.owned = True
            say(plan, f"{plan.vm} is READY")
            return
        except cloud.StillQueued as e:
            say(plan, f"{e}: keeping its place in the queue")
        except LauncherError as e:
            say(plan, f"create failed: {e}")
            if attempt >= CREATE_ATTEMPTS:
                _delete(plan, z, timing)
                raise
            time.sleep(delay)
            delay = min(2 * delay, 1800.0)


def _owned(plan: Plan) -> None:
    """The supervisor made this VM: it deletes it at the end."""
    plan.owned = True
    save(plan)


def _delete(plan: Plan, z: cloud.Zone, timing: Timing) -> None:
    try:
        node = z.find(plan.vm)
        d = cloud.deletion(z, plan.vm)
    except LauncherError:  # neither a node nor a queued resource: nothing to delete
        return
    say(plan, f"deleting {d.what}")
    d.run(timing.create_timeout)
    if node is not None:
        access.forget_pins(node)  # a node created again is a new machine


def _relaunch(plan: Plan, connect: Callable[[], Any]) -> None:
    """Bring the run back on the VM and `--resume` it: the run's own commit synced (not this
    checkout's HEAD), the workers bootstrapped the way the first VM was, the env file pushed
    again. On a VM that kept its disk each of these finds nothing to do."""
    from launcher.cluster import NothingToResume

    with connect() as c:
        c.sync(plan.commit)
        boot = plan.bootstrap or {}
        options = remote.InstallOptions(**boot.get("options", {}))
        c.bootstrap(options, boot.get("python"), sync_first=False)
        if plan.env_src:
            names = c.push_env(Path(plan.env_src), plan.env_file or contracts.ENV_ON_WORKER)
            say(plan, f"pushed {plan.env_src} ({len(names)} keys) to the workers")
        elif plan.env_file and c.targets[0].sh(f"test -f {shlex.quote(plan.env_file)}")[0] != 0:
            raise Unrecoverable(f"the job reads {plan.env_file}, which a VM created again does not have, and no "
                                f"--push-env file was given; on a new VM: `mllm env push --src FILE`, `mllm launch "
                                f"... --resume {plan.run}`, then `mllm watch {plan.run} --push-env FILE`")
        # Before its first checkpoint the run may start over; after it, it must resume (on storage
        # the recovery cannot reach, a lost checkpoint ends the run as failed, not silently from 0).
        from_zero_ok = plan.checkpoint is None or not durable(plan.checkpoints)
        try:
            c.launch(plan.recipe, plan.config, plan.overrides, plan.env_file, sync_first=False, force=True,
                     run_preflight=False, resume=plan.run, recoveries=plan.recoveries, resume_if_any=from_zero_ok)
        except NothingToResume as e:
            raise Unrecoverable(f"checkpoint step {plan.checkpoint} was reported, but {e}") from None
    say(plan, f"resumed {plan.run}")


def _finish(plan: Plan, z: cloud.Zone, connect: Callable[[], Any], status: str, code: int, timing: Timing,
            fetch: bool = True) -> int:
    """The run is over: bring its summary home, index it with its recoveries, delete the VM."""
    if fetch:
        try:
            with connect() as c:
                summary, entry = c.run(plan.run).fetch_summary(Path(contracts.RUNS_DIR))
            for line in runs.describe(plan.run, summary, entry):
                say(plan, line, save_it=False)
        except (LauncherError, ssh.ConnectionLost, *ssh.TRANSPORT_ERRORS) as e:
            say(plan, f"could not fetch the summary: {e}")
    runs.mark(plan.run, vm=plan.vm, zone=plan.zone, recipe=plan.recipe, commit=plan.commit,
              recoveries=plan.recoveries, **({} if status == "completed" else {"status": status}))
    if plan.keep_vm is False or (plan.keep_vm is None and plan.owned and status != "stopped"):
        _delete(plan, z, timing)
    else:
        why = ("--keep-vm" if plan.keep_vm else
               f"the run was stopped and can go on from its checkpoint there (`mllm launch ... --resume {plan.run}`)"
               if status == "stopped" else "the run only attached to it (`--delete-vm` deletes it)")
        say(plan, f"keeping {plan.vm}: {why}", save_it=False)
    plan.status = status
    say(plan, f"{plan.run} {status} after {plan.recoveries} recoveries"
              f"{f' and {plan.restarts} restarts' if plan.restarts else ''}")
    return code
