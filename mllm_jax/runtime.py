"""Devices, processes and the mesh: everything about *where* the computation runs.

One process per host (TPU VM worker). The launcher tells each process who it is through
environment variables (docs/contracts.md); JAX's own multi-controller runtime does the rest.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Literal

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mllm_jax.config import ConfigError, PositiveInt
from mllm_jax.contracts import EXIT_CRASHED, ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID

MESH_AXES = ("dp", "fsdp", "tp")
# The axes a batch is split over: every data-parallel replica gets its own rows.
BATCH_AXES = ("dp", "fsdp")



@dataclass
class JaxConfig:
    mesh_shape: str = "auto"
    """Device mesh over (dp, fsdp, tp): "auto" (all devices data-parallel), "1,-1,1" or
    "dp:1,fsdp:-1,tp:1"; -1 takes the remaining devices."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """Activations and matmuls."""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """Stored parameters and optimizer state."""
    distributed_timeout_sec: PositiveInt = 300
    """A run of several processes: give up (one clear line, exit 1) when they have not all
    joined process 0's coordinator after this long, instead of hanging."""

    def validate(self) -> None:
        parse_mesh_shape(self.mesh_shape)


def tune_host_allocator() -> None:
    """On the CPU backend, keep XLA's per-step scratch buffers in the heap.

    XLA:CPU allocates its temporary buffers afresh on every call; with glibc's defaults the
    large ones are mmap'ed and unmapped each time, ~5-14k page faults per nanoGPT CPU step, a
    third of its time (benchmarks/nanogpt_cpu.py). No mmap for large blocks, and a generous
    trim threshold and top pad, make the heap reuse them. Accelerators are left alone: their
    host heap is not on the hot path. No-op without glibc.
    """
    if jax.default_backend() != "cpu":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 64 << 20)


def init_distributed(timeout_sec: int = 300) -> None:
    """Join the other processes of this run, if the launcher started several.

    Reads MLLM_COORDINATOR_ADDRESS (host:port of process 0), MLLM_NUM_PROCESSES and
    MLLM_PROCESS_ID. Unset means a single process. On CPU the gloo collectives are used,
    so that several CPU processes can stand in for the hosts of a TPU slice.
    """
    coordinator = os.environ.get(ENV_COORDINATOR)
    if not coordinator:
        return
    try:
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
        process_id = int(os.environ[ENV_PROCESS_ID])
    except (KeyError, ValueError):
        raise ConfigError(
            f"{ENV_COORDINATOR} is set, so {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} must be integers"
        ) from None
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"{ENV_PROCESS_ID}={process_id} is outside 0..{num_processes - 1}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX itself aborts with a C++ stack trace at its own deadline: say what happened first.
    def give_up() -> None:
        print(f"error: jax.distributed: process {process_id} of {num_processes} could not join the coordinator "
              f"at {coordinator} within {timeout_sec} s (is every worker running this commit, and is the port "
              f"reachable from here? see jax.distributed_timeout_sec)", file=sys.stderr, flush=True)
        os._exit(EXIT_CRASHED)

    watchdog = threading.Timer(timeout_sec, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                                   initialization_timeout=timeout_sec + 60)
    finally:
        watchdog.cancel()


def parse_mesh_shape(spec: str) -> dict[str, int]:
    """Parse a mesh spec into axis sizes (-1 = the rest); see JaxConfig.mesh_shape."""
    if spec == "auto":
        return {"dp": -1, "fsdp": 1, "tp": 1}
    parts = [p.strip() for p in spec.split(",")]
    error = ConfigError(
        f"jax.mesh_shape: expected 'auto', '1,-1,1' or 'dp:1,fsdp:-1,tp:1', got {spec!r}"
    )
    if len(parts) != len(MESH_AXES):
        raise error
    sizes: dict[str, int] = {}
    for axis, part in zip(MESH_AXES, parts):
        m = re.fullmatch(r"(?:(\w+):)?(-?\d+)", part)
        if not m or (m.group(1) and m.group(1) != axis):
            raise error
        sizes[axis] = int(m.group(2))
    if any(v == 0 or v < -1 for v in sizes.values()) or list(sizes.values()).count(-1) > 1:
        raise error
    return sizes


def make_mesh(spec: str, devices: list | None = None) -> Mesh:
    """A (dp, fsdp, tp) mesh over all devices of all processes (or `devices`, e.g. a TPU
    topology's compile-only devices in preflight)."""
    sizes = parse_mesh_shape(spec)
    n = len(devices) if devices is not None else jax.device_count()
    known = int(np.prod([v for v in sizes.values() if v != -1]))
    if -1 in sizes.values():
        if n % known:
            raise ConfigError(f"jax.mesh_shape {spec!r} does not fit {n} devices")
        sizes = {k: (n // known if v == -1 else v) for k, v in sizes.items()}
    if int(np.prod(list(sizes.values()))) != n:
        raise ConfigError(
            f"jax.mesh_shape {spec!r} needs {int(np.prod(list(sizes.values())))} devices, found {n}"
        )
    # Auto axes: shardings are placed on inputs/outputs and XLA propagates the rest.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=auto, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def process_rows(global_batch_size: int) -> slice:
    """The rows of the global batch that this process feeds (its devices hold exactly these)."""
    per_process = global_batch_size // jax.process_count()
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


@functools.lru_cache(maxsize=2)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch (computed once per epoch, not once per step)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def step_indices(num_examples: int, global_batch_size: int, seed: int, step: int) -> np.ndarray:
    """Example indices of update `step` (-1 = empty filler row): a pure function of (seed,
    step), so a resumed run sees the same batches. Each epoch is a fresh permutation and
    its last batch may be partial."""
    steps_per_epoch = math.ceil(num_examples / global_batch_size)
    epoch, pos = divmod(step, steps_per_epoch)
    chunk = _epoch_order(num_examples, seed, epoch)[pos * global_batch_size:(pos + 1) * global_batch_size]
    return np.concatenate([chunk, np.full(global_batch_size - len(chunk), -1)])


def to_global(local: dict[str, np.ndarray], mesh: Mesh, global_batch_size: int) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size,) + v.shape[1:])
        for k, v in local.items()
    }


def to_host(x: jax.Array | np.ndarray) -> np.ndarray:
    """A (possibly multi-process) global array as one numpy array on every host; every
    process must call it when the array spans processes."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def check_batch(global_batch_size: int, mesh: Mesh, key: str = "train.global_batch_size") -> None:
    dp = data_parallel_size(mesh)
    if global_batch_size % dp:
        raise ConfigError(
            f"{key}={global_batch_size} is not divisible by the data-parallel size {dp} "
            f"(mesh {dict(mesh.shape)})"
        )


def agreed_time() -> int:
    """One time for the run, in seconds, agreed by every process (process 0 decides), so that all
    of them name the same run dir."""
    now = np.int64(time.time())
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        now = multihost_utils.broadcast_one_to_all(now)
    return int(now)


# Dense bf16 peak FLOP/s per chip, for MFU. CPUs have no datasheet number: we measure one.
_PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
}


# HBM per chip (datasheets: 32, 16, 95, 32 GB), for the share of it a compiled program needs.
# libtpu itself lets a program use a little less (31.25 GiB on a v6e): a share near 100% fails.
HBM_BYTES = {
    "TPU v4": 32 * 2**30,
    "TPU v5 lite": 16 * 2**30,
    "TPU v5": 95 * 2**30,
    "TPU v6 lite": 32 * 2**30,
}


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one chip of this kind (None: no datasheet number)."""
    return _PEAK_FLOPS.get(device_kind)


def memory_report(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled program (XLA's memory_analysis): what its arguments,
    outputs, temporaries and code take, and `peak` = arguments + outputs - aliased (donated)
    + temporaries, the HBM the program needs while it runs."""
    m = compiled.memory_analysis()
    out: dict = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp",
                                                                     "generated_code")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


class CompiledStep:
    """A jitted train step compiled ahead of its first call (every call has the same shapes and
    shardings), so that the run can report what XLA says it needs: `memory` is memory_report of
    it, with `device_kind` and `hbm_share` (peak / the chip's HBM) on a TPU; None before."""

    def __init__(self, jitted) -> None:
        self.jitted, self.compiled, self.memory = jitted, None, None

    def __call__(self, *args):
        if self.compiled is None:
            self.compiled = self.jitted.lower(*args).compile()
            self.memory = memory_report(self.compiled)
            kind = jax.devices()[0].device_kind
            if kind in HBM_BYTES:
                self.memory.update(device_kind=kind, hbm_share=self.memory["peak"] / HBM_BYTES[kind])
        return self.compiled(*args)


def peak_flops_per_second() -> float:
    """Peak FLOP/s of all devices of this run (datasheet for accelerators, measured for CPU)."""
    kind = jax.devices()[0].device_kind
    if kind in _PEAK_FLOPS:
        return _PEAK_FLOPS[kind] * jax.device_count()
    if jax.default_backend() == "cpu":
        # Virtual CPU devices share the host's cores: the host's matmul rate is the ceiling.
        return measure_matmul_flops() * jax.process_count()
    return float("nan")


def measure_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best f32 matmul FLOP/s of one device of this host (the CPU "peak")."""
    x = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32), jax.local_devices()[0])
    mm = jax.jit(lambda a: a @ a)
    mm(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mm(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
