"""The train loop every recipe shares: run dir, resume, steps, logging, eval, checkpoints, summary.

A recipe supplies a `Task` (its state, its jitted step, its batches and its eval); the loop
knows nothing about models or data. Step numbers count optimizer updates: the state at step
s has seen batches 0..s-1, and metrics logged at step s describe the update that made it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Protocol, cast

import jax
import numpy as np

from mllm_jax import config as config_lib
from mllm_jax import contracts, preemption, runtime, summary
from mllm_jax.checkpoint import Checkpointer, space_short
from mllm_jax.config import ConfigError, NonNegative, NonNegativeInt, PositiveInt
from mllm_jax.tracking import Console, Tracker, format_eta

Interval = Annotated[int | float, NonNegative]
"""A number of steps, or below 1 a fraction of the run's steps (Hugging Face's `eval_steps=0.05`)."""


@dataclass
class LoopConfig:
    """The loop's own keys; each recipe's `train` section extends this with its optimizer and batch."""

    log_every: PositiveInt = 10
    eval_every: Interval = 250
    """Evaluate every N steps (and always at the end); 0 = only at the end. A number below 1 is a
    fraction of the run's steps, rounded up, as Hugging Face's eval_steps (MiniOneRec's 0.05:
    every 5% of the run)."""
    checkpoint_every: Interval = 500
    """Save a checkpoint every N steps (and at the end); 0 = only at the end; below 1 a fraction of
    the run's steps, like eval_every."""
    keep_checkpoints: PositiveInt = 2
    checkpoint_dir: str | None = None
    """Where checkpoints go; None = <run dir>/checkpoints. A run of several processes (a TPU
    slice) needs one place every worker sees, e.g. gs://bucket/path: orbax's multi-host save
    waits for files that each worker writes."""
    best_metric: str = "eval/loss"
    """The evaluation metric that picks the best checkpoint and drives early stopping; lower is
    better when its name ends with "loss", else higher (Hugging Face's greater_is_better)."""
    load_best_model_at_end: bool = False
    """Keep the parameters of the best evaluation (<checkpoint_dir>/best) and finish the run (the
    HF export) with them instead of the last step's: Hugging Face's load_best_model_at_end."""
    early_stopping_patience: NonNegativeInt = 0
    """Stop after this many evaluations in a row without a new best best_metric (Hugging Face's
    EarlyStoppingCallback; MiniOneRec's sft uses 3); 0 = never stop early."""

    def validate(self) -> None:
        for key in ("eval_every", "checkpoint_every"):
            value = getattr(self, key)
            if isinstance(value, float) and value >= 1:
                raise ConfigError(f"train.{key}: expected a whole number of steps or a fraction of the run below 1, "
                                  f"got {value!r}")
        if not self.best_metric.startswith("eval/"):
            raise ConfigError(f"train.best_metric: expected an evaluation metric such as eval/loss or eval/ndcg@10, "
                              f"got {self.best_metric!r}")
        parent = getattr(super(), "validate", None)  # a recipe's train section also derives from OptimizerConfig
        if parent is not None:
            parent()

    @property
    def selects_best(self) -> bool:
        """Whether the run tracks its best evaluation (keeps it, or stops early on it)."""
        return self.load_best_model_at_end or self.early_stopping_patience > 0


def interval_steps(every: int | float, max_steps: int) -> int:
    """`eval_every` / `checkpoint_every` in steps: a fraction of `max_steps` rounded up (at least
    1), as Hugging Face's TrainerState.compute_steps; whole numbers as they are (0 = never)."""
    if isinstance(every, float) and 0 < every < 1:
        return max(1, math.ceil(max_steps * every))
    return int(every)


class Task(Protocol):
    """What a recipe hands to the loop."""

    state: Any
    """The train state (a pytree of sharded arrays); `state["step"]` counts updates."""

    max_steps: int
    """Updates in the whole run (a recipe may derive it, e.g. from epochs over its data)."""

    def train_step(self, state: Any, step: int) -> tuple[Any, dict[str, jax.Array]]:
        """One update on training batch number `step`: new state and scalar metrics."""

    def evaluate(self, state: Any) -> dict[str, float]:
        """Held-out metrics, e.g. {"eval/loss": ...}; must not touch the training data stream."""

    def learning_rate(self, step: int) -> float: ...

    def tokens(self, step: int) -> int:
        """Tokens the update number `step` computes on (padding included: it costs compute)."""

    flops_per_token: float

    step_memory: dict[str, int] | None
    """runtime.memory_report of the compiled train step, once it is compiled (None before)."""

    console_metrics: dict[str, str]
    """Optional: metrics of train_step to show on the console line too, name -> format ("hit {:.3f}")."""

    def finish(self, state: Any, console: Console) -> dict[str, Any]:
        """Last words of the recipe (e.g. a text sample); returned dict goes into the summary."""


@dataclass
class RunInfo:
    recipe: str
    run_dir: Path
    config: Any
    config_path: str | None
    mesh: jax.sharding.Mesh
    resume: bool
    start_if_no_checkpoint: bool = False
    """With `resume`: no complete checkpoint yet is not an error; the run starts from step 0."""
    allow_config_change: tuple[str, ...] = ()
    """With `resume`: settings (keys or sections) that may differ from the checkpoint's although
    they change what is computed (config.RESUME_MAY_CHANGE lists those that always may)."""


def resolve_run_dir(recipe: str, output_dir: str | None, resume: bool) -> Path:
    """The run dir: `output_dir` if given; with --resume the newest runs/<recipe>-*; else a new
    runs/<recipe>-<UTC time>-<short sha>."""
    if output_dir:
        return Path(output_dir)
    if resume:
        runs = Path(contracts.RUNS_DIR)
        candidates = sorted(p for p in runs.glob(f"{recipe}-*") if (p / contracts.CHECKPOINTS_DIR).is_dir())
        if not candidates:
            raise ConfigError(f"--resume: no {runs}/{recipe}-*/{contracts.CHECKPOINTS_DIR} found; "
                              "pass --set output_dir=RUN_DIR")
        return candidates[-1]
    sha = summary.git_info()["commit"] or "nogit"
    return Path(contracts.RUNS_DIR) / contracts.run_id(recipe, sha, runtime.agreed_time())


class _StopFlag:
    """Set by SIGTERM/SIGINT, or GCE's preemption notice (the metadata server's
    `instance/preempted`), so the loop can checkpoint and leave cleanly (spot preemption, `mllm
    stop`, Ctrl-C). A repeated TERM changes nothing (the checkpoint is on its way; KILL aborts); a
    second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.preempted = False
        self.previous = {sig: signal.signal(sig, self._set) for sig in (signal.SIGTERM, signal.SIGINT)}
        preemption.watch(self._notice)

    def _notice(self) -> None:
        self.preempted = True
        self.signal = self.signal or signal.SIGTERM

    @property
    def why(self) -> str:
        return "the metadata server's preemption notice" if self.preempted else f"signal {self.signal}"

    def _set(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = self.signal or signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self, step: int, sync_every: int) -> bool:
        """Whether to stop after `step`. One process looks at its flag every step (cheap); the
        processes of a slice agree (saving is collective) at every `sync_every`-th step only."""
        if jax.process_count() == 1:
            return self.signal is not None
        if step % sync_every:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.signal is not None))
        return bool(np.any(flags))


STOP_SYNC_STEPS = 10
"""A slice's processes agree on a stop request at every 10th step (and every log step): a
collective each step would stall the pipeline, and 10 steps stay well inside `mllm stop`'s grace."""


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a full disk or a kill mid-write leaves the old one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


class NoCheckpoint(ConfigError):
    """--resume found no complete checkpoint."""


def _open_for_resume(directory: str, cfg: LoopConfig, settings: dict) -> tuple[Checkpointer, int]:
    """The checkpointer of the run to continue and its latest step; refused in one line (and
    without creating anything) when there is none."""
    if "://" not in directory and not Path(directory).is_dir():
        raise NoCheckpoint(f"--resume: no checkpoint directory {directory}")
    checkpointer = Checkpointer(directory, cfg.checkpoint_every, cfg.keep_checkpoints, config=settings)
    step = checkpointer.latest_step()
    if step is None:
        checkpointer.close()
        raise NoCheckpoint(f"--resume: no checkpoint in {directory}")
    return checkpointer, step


def _check_resume_settings(checkpointer: Checkpointer, step: int, settings: dict, allowed: tuple[str, ...]) -> None:
    """Refuse, before anything is built, a resume whose settings would make the run's checkpoints,
    metrics and config_resolved.yaml describe a run that did not happen."""
    recorded = checkpointer.recorded_config(step)
    if recorded is None:  # saved before checkpoints recorded their config: nothing to compare
        return
    changes = config_lib.resume_changes(recorded, settings, allowed)
    if changes:
        raise ConfigError(f"--resume: checkpoint {step} was trained with other settings: {'; '.join(changes[:4])}"
                          f"{f' (and {len(changes) - 4} more)' if len(changes) > 4 else ''}; they change the model, "
                          "the data or the numerics: pass --allow-config-change KEY for each change meant")


BEST_DIR = "best"
"""Under the checkpoint dir: the parameters of the best evaluation (train.load_best_model_at_end)."""


class Selection:
    """Model selection over the run's evaluations, as Hugging Face's Trainer with
    load_best_model_at_end and EarlyStoppingCallback: the best value of `train.best_metric` so far
    (strictly better replaces it), the evaluations since, and with load_best_model_at_end the
    parameters of that evaluation, saved in <checkpoint_dir>/best."""

    def __init__(self, cfg: LoopConfig, directory: str, history: list[tuple[int, float]]):
        """`history`: the (step, value) of the metric up to the step resumed from (the checkpoint's events)."""
        self.metric, self.patience = cfg.best_metric, cfg.early_stopping_patience
        self.higher = not cfg.best_metric.endswith("loss")
        self.best: tuple[int, float] | None = None
        self.since = 0
        """Evaluations since the best one."""
        for step, value in history:
            self._update(step, value)
        if jax.process_count() > 1:  # every process must take the same decisions (saving is collective)
            from jax.experimental import multihost_utils

            best = self.best or (-1, float("nan"))
            step, value, since = multihost_utils.broadcast_one_to_all(
                np.asarray([best[0], best[1], self.since], np.float64))
            self.best, self.since = (int(step), float(value)) if step >= 0 else None, int(since)
        self.checkpointer = None
        if cfg.load_best_model_at_end:
            self.checkpointer = Checkpointer(directory.rstrip("/") + "/" + BEST_DIR, every=0, keep=1, name=BEST_DIR)
            for step in self.checkpointer.manager.all_steps():  # saved after the checkpoint resumed from
                if self.best is None or step != self.best[0]:
                    self.checkpointer.manager.delete(step)

    def _update(self, step: int, value: float) -> bool:
        better = self.best is None or (value > self.best[1] if self.higher else value < self.best[1])
        if better:
            self.best, self.since = (step, value), 0
        else:
            self.since += 1
        return better

    def observe(self, step: int, evals: dict[str, float], state: Any) -> bool:
        """Take an evaluation's metrics; returns whether to stop early (patience used up)."""
        if self.metric not in evals:
            raise ConfigError(f"train.best_metric {self.metric}: the evaluation has no such metric "
                              f"(it has {', '.join(evals) or 'none'})")
        if self._update(step, evals[self.metric]) and self.checkpointer is not None:
            self.checkpointer.maybe_save(step, {"params": state["params"]}, force=True)
        return bool(self.patience) and self.since >= self.patience

    def best_state(self, state: Any) -> Any:
        """`state` with the best evaluation's parameters (restored from <checkpoint_dir>/best)."""
        assert self.checkpointer is not None and self.best is not None
        self.checkpointer.manager.wait_until_finished()
        params = self.checkpointer.restore(self.best[0], {"params": state["params"]})["params"]
        return {**state, "params": params}

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric, "step": self.best[0] if self.best else None,
                               "value": self.best[1] if self.best else None}
        if self.checkpointer is not None:
            out["dir"] = self.checkpointer.directory
        return out

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()


def run(info: RunInfo, make_task: Callable[[], Task]) -> contracts.RunSummary:
    """Train `make_task()` as configured in `info`; returns the run summary (also written to
    <run dir>/run_summary.json by process 0, on success and on failure).

    Nothing is written before the task is built and, on --resume, the checkpoint is found to fit
    it: bad input (ConfigError) leaves no run dir behind and an earlier run's files untouched."""
    cfg, run_dir = info.config, info.run_dir
    main = jax.process_index() == 0
    started = time.time()
    result: dict[str, Any] = {  # filled to a contracts.RunSummary as the run goes
        "status": "running",
        "recipe": info.recipe,
        "run_dir": str(run_dir.absolute()),
        "config_path": info.config_path,
        "config_hash": config_lib.config_hash(cfg),
        "git": summary.git_info(),
        "versions": summary.versions(),
        **summary.hardware(info.mesh),
        "recoveries": _recoveries(),
        "started_at": _iso(started),
    }
    directory = cfg.train.checkpoint_dir or str(run_dir / contracts.CHECKPOINTS_DIR)
    settings = config_lib.to_dict(cfg)
    config_lib.check_keys(settings, info.allow_config_change, "--allow-config-change")
    checkpointer, resume_step, fresh_start = None, None, False
    if info.resume:
        try:
            checkpointer, resume_step = _open_for_resume(directory, cfg.train, settings)
        except NoCheckpoint:
            if not info.start_if_no_checkpoint:
                raise
            fresh_start = True  # preempted before its first checkpoint: from step 0, in the same run dir
    try:
        if checkpointer is not None:
            _check_resume_settings(checkpointer, resume_step, settings, info.allow_config_change)
        task = make_task()
        if checkpointer is not None:
            checkpointer.check_compatible(resume_step, task.state)
            if 0 < task.max_steps <= resume_step and not info.start_if_no_checkpoint:
                raise ConfigError(f"--resume: the checkpoint is at step {resume_step} and the run trains "
                                  f"{task.max_steps} steps: nothing to train; raise train.max_steps to go on")
        short = space_short(directory, task.state)
        if short:
            raise ConfigError(f"train.checkpoint_dir {short}; free some space or choose another directory")
    except BaseException as e:
        if checkpointer is not None:
            checkpointer.close()
        if main and not info.resume and not isinstance(e, ConfigError):  # a crash of a new run is reported
            result.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=20),
                          eval_losses=[], best_eval_loss=None, checkpoint_dir=directory, latest_checkpoint_step=None,
                          wandb={"mode": cfg.wandb.mode}, finished_at=_iso(time.time()),
                          wall_time_sec=round(time.time() - started, 3))
            run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(run_dir / contracts.SUMMARY_FILE, json.dumps(result, indent=2) + "\n")
        raise
    if checkpointer is None:
        checkpointer = Checkpointer(directory, cfg.train.checkpoint_every, cfg.train.keep_checkpoints, config=settings)
    checkpointer.every = interval_steps(cfg.train.checkpoint_every, task.max_steps)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / contracts.CONFIG_FILE, config_lib.to_yaml(cfg))
        _point_latest(run_dir)
    history = checkpointer.history(resume_step) if resume_step is not None else None
    tracker = Tracker(run_dir, cfg.wandb, config_lib.to_dict(cfg), active=main,
                      resume_step=0 if fresh_start else resume_step, resume_history=history)
    console: Console | None = None
    selection: Selection | None = None
    stop = _StopFlag()
    try:
        if cfg.train.selects_best and task.max_steps > 0:  # an evaluation-only run has nothing to select
            events = history if history is not None else tracker.history
            selection = Selection(cfg.train, checkpointer.directory,
                                  [(e["step"], e[cfg.train.best_metric]) for e in events
                                   if cfg.train.best_metric in e and e["step"] <= (resume_step or 0)])
        console = Console(task.max_steps, resume_step or 0, active=main)
        state = task.state
        if resume_step is not None:
            state = checkpointer.restore(resume_step, state)
            console.print(f"resumed from step {resume_step} ({checkpointer.directory})")
        elif fresh_start:
            console.print(f"no complete checkpoint in {checkpointer.directory} yet: starting from step 0")
        result["status"] = _loop(task, state, cfg.train, tracker, console, checkpointer, stop, result, selection)
    except BaseException as e:  # the summary must say why a run died, whatever killed it
        result["status"] = "failed"
        result["error"] = f"{type(e).__name__}: {e}"
        if not isinstance(e, (ConfigError, KeyboardInterrupt)):
            result["traceback"] = traceback.format_exc(limit=20)
        raise
    finally:  # signals stay caught until the end: a repeated TERM must not kill the pending save
        if console is not None:
            console.close()
        checkpointer.close()
        if selection is not None:
            selection.close()
            result["best_checkpoint"] = selection.summary()
        eval_losses = tracker.values("eval/loss")
        result.update(
            eval_losses=[{"step": s, "loss": v} for s, v in eval_losses],
            best_eval_loss=(dict(zip(("step", "loss"), min(eval_losses, key=lambda e: e[1])))
                            if eval_losses else None),
            checkpoint_dir=checkpointer.directory,
            latest_checkpoint_step=checkpointer.latest_step(),
            wandb=tracker.wandb_summary(),
            finished_at=_iso(time.time()),
            wall_time_sec=round(time.time() - started, 3),
        )
        tracker.finish(exit_code=0 if result["status"] == "completed" else 1)
        if main:
            write_atomic(run_dir / contracts.SUMMARY_FILE, json.dumps(result, indent=2) + "\n")
        stop.restore()
    return cast(contracts.RunSummary, result)


def _loop(task: Task, state: Any, cfg: LoopConfig, tracker: Tracker, console: Console,
          checkpointer: Checkpointer, stop: _StopFlag, result: dict[str, Any], selection: Selection | None) -> str:
    step = int(jax.device_get(state["step"]))
    first_step, max_steps = step, task.max_steps
    eval_every = interval_steps(cfg.eval_every, max_steps)
    peak = runtime.peak_flops_per_second()
    step_times: list[tuple[float, int]] = []  # (seconds per step, steps) of each timed log interval
    timed_tokens = 0
    t_mark, step_mark, tokens_mark = time.perf_counter(), step, 0
    metrics: dict[str, jax.Array] = {}
    last_eval_step = None
    status = "completed"

    while step < max_steps:
        state, metrics = task.train_step(state, step)
        tokens_mark += task.tokens(step)
        step += 1
        if step == first_step + 1:
            jax.block_until_ready(metrics)  # the first step compiles: keep it out of the timings
            t_mark, step_mark, tokens_mark = time.perf_counter(), step, 0
        if step % cfg.log_every == 0 or step == max_steps:
            # A task's own names ("rl/kl", "perf/rollout_sec") as they are; the rest under train/.
            values = {k if "/" in k else f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
            values["train/lr"] = task.learning_rate(step - 1)
            now = time.perf_counter()
            if step > step_mark:
                dt = (now - t_mark) / (step - step_mark)
                step_times.append((dt, step - step_mark))
                timed_tokens += tokens_mark
                values["perf/step_time_sec"] = dt
                values["perf/tokens_per_sec"] = tokens_mark / (now - t_mark)
                values["perf/mfu"] = task.flops_per_token * values["perf/tokens_per_sec"] / peak
            committed = checkpointer.committed_step()
            if committed is not None:  # the recovery supervisor learns from it that a relaunch must resume
                values["checkpoint/step"] = committed
            t_mark, step_mark, tokens_mark = now, step, 0
            tracker.log(step, values)
            console.print(_log_line(step, max_steps, values, _mean_step_time(step_times),
                                    getattr(task, "console_metrics", {})))
        if stop.requested(step, STOP_SYNC_STEPS if step % cfg.log_every else 1):
            status = "stopped"
        console.advance(step)
        early_stop = False
        if status != "stopped" and ((eval_every and step % eval_every == 0) or step == max_steps):
            result["eval_metrics"] = _evaluate(task, state, step, tracker, console)
            last_eval_step = step
            if selection is not None:  # stopping early at the last step would change nothing
                early_stop = selection.observe(step, result["eval_metrics"], state) and step < max_steps
            t_mark, step_mark, tokens_mark = time.perf_counter(), step, 0  # evaluation time is not step time
        checkpointer.maybe_save(step, state, force=step == max_steps or status == "stopped" or early_stop,
                                history=tracker.history if tracker.active else None)
        if status == "stopped":
            console.print(f"stop requested ({stop.why}): checkpoint saved at step {step}")
            break
        if early_stop:
            best_step, best_value = selection.best
            console.print(f"early stopping at step {step}: {cfg.best_metric} has not improved on step {best_step}'s "
                          f"{best_value:.4f} for {selection.since} evaluations (train.early_stopping_patience)")
            result["early_stopped_at"] = step
            break

    if status == "completed" and last_eval_step != step:  # nothing to train (evaluation only): evaluate once
        result["eval_metrics"] = _evaluate(task, state, step, tracker, console)
        last_eval_step = step
    if metrics:
        result["final_train_loss"] = float(jax.device_get(metrics["loss"]))
    if task.step_memory:
        result["step_memory"] = task.step_memory
    result["final_step"] = step
    result["last_eval_step"] = last_eval_step
    if step_times:
        timed_seconds = sum(dt * n for dt, n in step_times)
        result["tokens_per_sec"] = timed_tokens / timed_seconds
        result["step_time_sec"] = _mean_step_time(step_times)
        result["mfu"] = task.flops_per_token * result["tokens_per_sec"] / peak
        per_step = sorted(dt for dt, _ in step_times)
        result["step_time_stats"] = {  # over log intervals (single steps with log_every 1), compile excluded
            "timed_steps": sum(n for _, n in step_times), "intervals": len(per_step),
            "mean": result["step_time_sec"], "median": float(np.median(per_step)),
            "min": per_step[0], "max": per_step[-1]}
    if status == "completed":
        if selection is not None and selection.checkpointer is not None and selection.best is not None \
                and selection.best[0] != step:
            state = selection.best_state(state)
            console.print(f"finishing with the best evaluation's parameters: step {selection.best[0]}, "
                          f"{cfg.best_metric} {selection.best[1]:.4f} (train.load_best_model_at_end)")
        result.update(task.finish(state, console))
    return status


def _evaluate(task: Task, state: Any, step: int, tracker: Tracker, console: Console) -> dict[str, float]:
    evals = task.evaluate(state)
    if not evals:  # e.g. rl without data.test_file: nothing to evaluate
        return evals
    tracker.log(step, evals)
    console.print(f"eval step {step}: " + "  ".join(f"{k} {v:.0f}" if k.endswith("_count") else f"{k} {v:.4f}"
                                                     for k, v in evals.items()))
    return evals


def _mean_step_time(step_times: list[tuple[float, int]]) -> float:
    steps = sum(n for _, n in step_times)
    return sum(dt * n for dt, n in step_times) / steps if steps else 0.0


def _log_line(step: int, total: int, v: dict[str, float], sec_per_step: float, extra: dict[str, str]) -> str:
    """One console line; `extra` (a task's `console_metrics`: metric -> format) adds its own."""
    parts = [f"step {step}/{total}", f"loss {v['train/loss']:.4f}", f"lr {v['train/lr']:.2e}"]
    parts += [fmt.format(v[name]) for name, fmt in extra.items() if name in v]
    if "perf/tokens_per_sec" in v:
        parts += [f"{v['perf/tokens_per_sec']:,.0f} tok/s", f"{1000 * v['perf/step_time_sec']:.1f} ms/step",
                  f"mfu {100 * v['perf/mfu']:.2f}%"]
    if sec_per_step:
        parts.append(f"eta {format_eta((total - step) * sec_per_step)}")
    return " | ".join(parts)


def _point_latest(run_dir: Path) -> None:
    """<parent>/latest -> the newest run dir, for humans and for `mllm` commands."""
    link = run_dir.parent / contracts.LATEST
    tmp = run_dir.parent / f".latest-{run_dir.name}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    tmp.replace(link)


def _recoveries() -> int:
    """$MLLM_RECOVERIES as the supervisor set it (0 when unset or not a count)."""
    text = os.environ.get(contracts.ENV_RECOVERIES, "0")
    return int(text) if text.isdigit() else 0


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
