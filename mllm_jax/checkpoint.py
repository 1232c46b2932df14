"""Orbax checkpoints of the train state: save every N steps, keep the last K, restore sharded."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from mllm_jax.config import ConfigError

HISTORY_KEY = "metrics"
"""In a checkpoint's custom metadata: metrics.jsonl's events up to its step."""
CONFIG_KEY = "config"
"""In each checkpoint's custom metadata: the resolved config it was trained with (what a
--resume compares its own with)."""


def space_short(directory: str, state: Any) -> str | None:
    """Why one more checkpoint of `state` would not fit on the local disk of `directory` (None:
    it fits, or it is a bucket). Checked before each save: orbax's writers fail noisily mid-save."""
    if "://" in directory:
        return None
    need = int(1.1 * sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes")))
    place = Path(directory)
    while not place.exists():
        place = place.parent
    free = shutil.disk_usage(place).free
    if free >= need:
        return None
    return f"{directory}: a checkpoint needs about {need / 2**20:,.1f} MiB, {free / 2**20:,.1f} MiB are free"


class Checkpointer:
    """Thin wrapper over orbax's CheckpointManager with the run's save policy."""

    def __init__(self, directory: str, every: int, keep: int, name: str = "train", config: dict | None = None):
        """`directory`: a local path or a bucket URL such as gs://bucket/run (orbax's epath).
        `name` keys this manager's cross-process barriers: orbax names them by step alone
        (`_async_write_complete.<step>`), so two managers saving one step at once (the last
        step's checkpoint and the best one, when the last evaluation is a new best) would share
        a barrier and fail a multi-process run at its end. `config`: the run's resolved settings,
        saved with each checkpoint."""
        self.every = every
        self.config = config
        self.directory = directory if "://" in directory else str(Path(directory).absolute())
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers=ocp.StandardCheckpointHandler())  # known before any save: metadata of old steps
        except OSError as e:  # e.g. a path under a file, or no permission: the config's fault, one line
            raise ConfigError(f"train.checkpoint_dir {directory}: cannot create it ({e.strerror or e})") from None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def committed_step(self) -> int | None:
        """The latest step whose save is complete (a save still being written does not count):
        what a run killed now would resume from."""
        steps = sorted(self.manager.all_steps())
        if steps and self.manager.is_saving_in_progress():
            steps = steps[:-1]
        return steps[-1] if steps else None

    def maybe_save(self, step: int, state: Any, force: bool = False, history: list[dict] | None = None) -> bool:
        """Save when `step` is on the interval (or `force`); saving is asynchronous. A disk too
        full for it raises OSError(ENOSPC) before anything is written. `history` (the run's
        metric events so far) travels in the checkpoint's metadata: a run resumed on a new VM,
        whose disk is gone, still has every step's metrics."""
        if not force and (self.every <= 0 or step % self.every):
            return False
        if step in self.manager.all_steps():
            return False
        short = space_short(self.directory, state)
        if short:
            raise OSError(errno.ENOSPC, f"No space left on device: {short}")
        metadata = {**({HISTORY_KEY: history} if history is not None else {}),
                    **({CONFIG_KEY: self.config} if self.config is not None else {})}
        return self.manager.save(step, args=ocp.args.StandardSave(state), force=True, custom_metadata=metadata or None)

    def history(self, step: int) -> list[dict] | None:
        """The metric events saved with checkpoint `step` (None: saved without them)."""
        found = (self.manager.metadata(step).custom_metadata or {}).get(HISTORY_KEY)
        return found if isinstance(found, list) else None

    def recorded_config(self, step: int) -> dict | None:
        """The resolved config checkpoint `step` was saved with (None: saved without one)."""
        found = (self.manager.metadata(step).custom_metadata or {}).get(CONFIG_KEY)
        return found if isinstance(found, dict) else None

    def check_compatible(self, step: int, like: Any) -> None:
        """Refuse, in one line and before anything is restored or written, a checkpoint whose
        tree or array shapes differ from the live state (e.g. a resume with another model size)."""
        def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
            leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
            return {jax.tree_util.keystr(p, simple=True, separator="."): tuple(x.shape) for p, x in leaves}

        saved, live = shapes(self.manager.item_metadata(step).tree), shapes(like)
        if saved == live:
            return
        where = f"checkpoint {step} in {self.directory}"
        missing, extra = sorted(set(saved) - set(live)), sorted(set(live) - set(saved))
        if missing or extra:
            raise ConfigError(f"{where} does not fit this config: the checkpoint has {', '.join(missing[:3]) or '-'} "
                              f"that the model lacks, the model has {', '.join(extra[:3]) or '-'} that it lacks")
        diff = [k for k in saved if saved[k] != live[k]]
        raise ConfigError(f"{where} does not fit this config: {len(diff)} array(s) differ in shape, e.g. {diff[0]} "
                          f"is {saved[diff[0]]} there and {live[diff[0]]} here (same model settings as that run?)")

    def restore(self, step: int, like: Any) -> Any:
        """Restore `step` with the shapes, dtypes and shardings of the live state `like`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        """Wait for pending saves to land on disk."""
        self.manager.wait_until_finished()
        self.manager.close()
