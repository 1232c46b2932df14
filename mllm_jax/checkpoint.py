"""Orbax checkpoints of the train state: save every N steps, keep the last K, restore sharded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper over orbax's CheckpointManager with the run's save policy."""

    def __init__(self, directory: str, every: int, keep: int):
        """`directory`: a local path or a bucket URL such as gs://bucket/run (orbax's epath)."""
        self.every = every
        self.directory = directory if "://" in directory else str(Path(directory).absolute())
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def maybe_save(self, step: int, state: Any, force: bool = False) -> bool:
        """Save when `step` is on the interval (or `force`); saving is asynchronous."""
        if not force and (self.every <= 0 or step % self.every):
            return False
        if step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore(self, step: int, like: Any) -> Any:
        """Restore `step` with the shapes, dtypes and shardings of the live state `like`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        """Wait for pending saves to land on disk."""
        self.manager.wait_until_finished()
        self.manager.close()
