"""Preflight: compile a recipe's programs for a Cloud TPU slice on any Linux x86-64 machine,
before a VM costs money.

libtpu's compiler runs without a TPU: `jax.experimental.topologies` gives the compile-only
devices of an accelerator type, the recipe builds its real programs over a mesh of them on
abstract arguments (`jax.ShapeDtypeStruct`: the shapes come from config.json and the
tokenizer; no weights are read or allocated), and `.lower().compile()` runs the TPU compiler.
XLA then tells per chip what each program needs in HBM (`memory_analysis`) and what its
cost model expects (`cost_analysis`: FLOPs and `optimal_seconds`) — an estimate, not a
measurement. A program that does not fit fails to compile; that is reported, not raised.

Results are cached by everything that shapes the programs (the resolved config, the model's
config and vocabulary, the topology, the jax and libtpu versions and this package's source),
so the second preflight of a config is a cache read.

This module imports JAX lazily: the launcher imports it to format reports.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mllm_jax import config as config_lib
from mllm_jax.config import ConfigError
from mllm_jax.contracts import cache_dir
from mllm_jax.recipes import RECIPES

# accelerator type -> (topology name, chips per host, chip config), as maxtext's
# accelerator_to_spec_map: single-host slices hold all their chips on one host, multi-host
# v5e/v6e slices 4 per host, v4/v5p 4 megacore chips per host.
TOPOLOGIES: dict[str, tuple[str, tuple[int, int, int], str]] = {
    **{f"v4-{2 * n}": (f"v4:{t}", (2, 2, 1), "megacore")
       for n, t in ((4, "2x2x1"), (8, "2x2x2"), (16, "2x2x4"), (32, "2x4x4"))},
    **{f"v5p-{2 * n}": (f"v5:{t}", (2, 2, 1), "megacore")
       for n, t in ((4, "2x2x1"), (8, "2x2x2"), (16, "2x2x4"), (32, "2x4x4"))},
    **{f"{name}-{n}": (f"{gen}:{t}", bounds, "default")
       for name, gen in (("v5litepod", "v5e"), ("v6e", "v6e"))
       for n, t, bounds in ((1, "1x1", (1, 1, 1)), (4, "2x2", (2, 2, 1)), (8, "2x4", (2, 4, 1)),
                            (16, "4x4", (2, 2, 1)), (32, "4x8", (2, 2, 1)), (64, "8x8", (2, 2, 1)))},
}

CACHE_VERSION = 1
"""Bumped when the report's shape changes: older cache entries are then ignored."""


# ----------------------------------------------------------------------------- libtpu

def _libtpu_requirement() -> str:
    """The libtpu version this jax pins for its `tpu` extra, e.g. "libtpu==0.0.42.*"."""
    for req in importlib.metadata.requires("jax") or []:
        name, _, marker = req.partition(";")
        if name.strip().startswith("libtpu") and "tpu" in marker:
            return name.strip().replace(" ", "")
    return "libtpu"


def check_platform() -> None:
    """ConfigError where libtpu does not exist: it is built for Linux x86-64 only."""
    machine = platform.machine().lower()
    if not (sys.platform.startswith("linux") and machine in ("x86_64", "amd64")):
        raise ConfigError(f"preflight needs libtpu, the TPU compiler, which is built for Linux x86-64 only "
                          f"(this is {sys.platform} {machine}); run it on a Linux x86-64 machine or a TPU VM, "
                          "or launch with --no-preflight")


def libtpu_library() -> str:
    """The path of libtpu.so for the TPU compiler: $TPU_LIBRARY_PATH, an installed libtpu
    package (a TPU VM's jax[tpu]), else the version this jax pins, installed once with uv
    into cache_dir() — not into the environment, where every JAX process on a machine
    without a TPU would then try to start one. ConfigError where libtpu does not exist
    (it is built for Linux x86-64 only) or cannot be installed."""
    check_platform()
    env = os.environ.get("TPU_LIBRARY_PATH")
    if env and Path(env).is_file():
        return env
    spec = importlib.util.find_spec("libtpu")
    if spec is not None and spec.origin:
        found = Path(spec.origin).parent / "libtpu.so"
        if found.is_file():
            return str(found)
    requirement = _libtpu_requirement()
    target = cache_dir() / requirement.replace("==", "-").replace("*", "x")  # e.g. libtpu-0.0.42.x
    library = target / "libtpu" / "libtpu.so"
    if library.is_file():
        return str(library)
    from uv import find_uv_bin

    print(f"preflight: installing {requirement} (the TPU compiler, about 200 MB, once) into {target}",
          file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".libtpu-", dir=target.parent))
    try:
        out = subprocess.run([find_uv_bin(), "pip", "install", "--quiet", "--no-deps", "--python", sys.executable,
                              "--target", str(tmp), requirement], capture_output=True, text=True)
        if out.returncode or not (tmp / "libtpu" / "libtpu.so").is_file():
            reason = (out.stderr.strip().splitlines() or ["no libtpu.so in the installed package"])[-1][:300]
            raise ConfigError(f"preflight: could not install {requirement} ({reason})")
        try:
            tmp.rename(target)
        except OSError:  # another preflight installed it meanwhile
            if not library.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(library)


def use_libtpu() -> str:
    """Point JAX at libtpu for compiling only (before JAX starts): the default backend stays
    this machine's CPU, the TPU devices come from `topologies`. Returns libtpu's version."""
    library = libtpu_library()
    os.environ["TPU_LIBRARY_PATH"] = library
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server to ask here
    # Compiling touches no TPU device: several preflights (or a TPU job) may load libtpu at once
    # without its /tmp/libtpu_lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    dist = next(Path(library).parent.parent.glob("libtpu-*.dist-info"), None)
    return dist.name.removeprefix("libtpu-").removesuffix(".dist-info") if dist else "unknown"


def topology_devices(accelerator_type: str) -> list:
    """The compile-only devices of a slice of `accelerator_type` (e.g. v6e-8), in process order."""
    if accelerator_type not in TOPOLOGIES:
        raise ConfigError(f"--type {accelerator_type!r}: preflight knows {', '.join(TOPOLOGIES)}")
    from jax.experimental import topologies

    name, bounds, chip_config = TOPOLOGIES[accelerator_type]
    kwargs: dict[str, Any] = {"chips_per_host_bounds": bounds}
    if chip_config != "default":
        kwargs.update(chip_config_name=chip_config, num_slices=1, wrap=(False, False, False))
    devices = topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs).devices
    return sorted(devices, key=lambda d: (d.process_index, d.id))


# ----------------------------------------------------------------------------- programs

@dataclass
class Program:
    """One compiled program of a recipe, on abstract arguments."""

    name: str
    jitted: Any
    """A jax.jit-wrapped function."""
    args: tuple
    """jax.ShapeDtypeStruct trees, with shardings over the topology's mesh."""
    model_flops: float | None = None
    """The model's FLOPs in one run of the program (6N-style, for MFU); None: no MFU."""
    pieces: list[tuple[int, Any, tuple]] | None = None
    """(times, jitted, args) of loop-free parts whose XLA estimates add up to the program's,
    for a program with loops (XLA's cost model counts a loop body once); None: the program's own."""
    note: str = ""


@dataclass
class Plan:
    """What a recipe hands to preflight: its programs, the facts that shaped them (part of the
    cache key, shown in the report) and the knobs that lower its memory."""

    programs: list[Program]
    facts: dict[str, Any]
    knobs: list[str] = field(default_factory=list)


def _source_hash() -> str:
    """This package's source: a change to any program invalidates the cache."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


# libtpu's out-of-HBM compile errors: "...HLO temporaries (93.86G) exceeds available HBM (31.25G)",
# and older ones "Used 58.98G of 31.25G hbm".
_OOM = re.compile(r"(?:temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"
                  r"|Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _estimate(pieces: list[tuple[int, Any, tuple]], compiled: Any = None) -> dict[str, float]:
    """XLA's optimal_seconds and FLOPs, summed over the pieces (each compiled; `compiled` is the
    one piece's program when already compiled). XLA's TPU cost model gives some operations no
    estimate and counts each of them as -1 s: those are left out (the fraction is kept), so the
    estimate is a lower bound on what the costed operations take."""
    seconds = flops = 0.0
    uncosted = 0
    for times, jitted, args in pieces:
        cost = (compiled or jitted.lower(*args).compile()).cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        s = float(cost.get("optimal_seconds", 0.0))
        if s < 0:
            uncosted += times * math.ceil(-s)
            s -= math.floor(s)
        seconds += times * s
        flops += times * float(cost.get("flops", 0.0))
    return {"seconds": seconds, "flops_per_chip": flops, "uncosted_ops": uncosted}


def _compile(program: Program, hbm: int, peak: float | None, chips: int, estimate: bool = True) -> dict[str, Any]:
    """Compile one program; its memory, compile time and (where XLA can tell, and `estimate`) estimate."""
    from jax.errors import JaxRuntimeError

    out: dict[str, Any] = {"name": program.name, "note": program.note}
    started = time.perf_counter()
    try:
        compiled = program.jitted.lower(*program.args).compile()
    except JaxRuntimeError as e:
        text = str(e)
        found = _OOM.search(text)
        if "RESOURCE_EXHAUSTED" not in text and not found:
            raise
        g = [x for x in found.groups() if x is not None] if found else []
        out.update(fits=False, compile_sec=round(time.perf_counter() - started, 2), memory=None,
                   needed=float(g[0]) * _UNITS[g[1]] if g else None,
                   available=float(g[2]) * _UNITS[g[3]] if g else hbm,
                   error=text.strip().splitlines()[0][:300])
        return out
    from mllm_jax import runtime

    memory = runtime.memory_report(compiled)
    out.update(fits=memory["peak"] <= hbm, compile_sec=round(time.perf_counter() - started, 2), memory=memory,
               share=memory["peak"] / hbm, needed=memory["peak"], available=hbm)
    pieces = program.pieces
    if not estimate:
        out["estimate"] = None
        return out
    if pieces is None and " while(" in compiled.as_text():
        out["estimate"] = None  # XLA would count each loop body once
        return out
    found = _estimate(pieces) if pieces is not None else _estimate([(1, program.jitted, program.args)], compiled)
    if program.model_flops and peak and found["seconds"] > 0:
        found["mfu"] = program.model_flops / (found["seconds"] * peak * chips)
    out["estimate"] = found
    return out


def run(recipe: str, config: str | None, overrides: list[str], accelerator_type: str,
        use_cache: bool = True, estimate: bool = True) -> dict[str, Any]:
    """Preflight `recipe` with this config for `accelerator_type`: the report (see
    docs/contracts.md), also cached. Bad input is a ConfigError. `estimate=False` skips XLA's
    cost-model estimate, whose loop bodies compile one by one (about as long again as the
    programs): what `mllm launch`'s fit check does."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
    if accelerator_type not in TOPOLOGIES:
        raise ConfigError(f"--type {accelerator_type!r}: preflight knows {', '.join(TOPOLOGIES)}")
    module = importlib.import_module(RECIPES[recipe])
    cfg = config_lib.load_config(module.Config, config, list(overrides))
    libtpu_version = use_libtpu()
    import jax

    from mllm_jax import runtime

    devices = topology_devices(accelerator_type)
    mesh = runtime.make_mesh(cfg.jax.mesh_shape, devices)
    plan = module.preflight(cfg, mesh)
    kind = devices[0].device_kind
    hbm, peak = runtime.HBM_BYTES.get(kind, 0), runtime.peak_flops(kind)
    key_text = json.dumps({"v": CACHE_VERSION, "recipe": recipe, "config": config_lib.to_yaml(cfg),
                           "facts": plan.facts, "type": accelerator_type, "estimate": estimate, "jax": jax.__version__,
                           "libtpu": libtpu_version, "source": _source_hash()}, sort_keys=True, default=str)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    cached = cache_dir() / "preflight" / f"{key}.json"
    if use_cache and cached.is_file():
        try:
            report = json.loads(cached.read_text())
            report["cached"] = True
            return report
        except (OSError, json.JSONDecodeError):
            pass
    topology, _, _ = TOPOLOGIES[accelerator_type]
    report: dict[str, Any] = {
        "recipe": recipe, "accelerator_type": accelerator_type, "topology": topology, "chips": len(devices),
        "hosts": len({d.process_index for d in devices}), "device_kind": kind, "hbm_per_chip": hbm,
        "peak_flops_per_chip": peak, "mesh": dict(mesh.shape), "jax": jax.__version__, "libtpu": libtpu_version,
        "facts": plan.facts, "knobs": plan.knobs, "cached": False,
        "programs": [_compile(p, hbm, peak, len(devices), estimate) for p in plan.programs],
    }
    report["fits"] = all(p["fits"] for p in report["programs"])
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(cached)
    return report


# ----------------------------------------------------------------------------- the report

def _gib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


def verdict(report: dict[str, Any]) -> str:
    """One line: fits with the largest program's share, or what does not fit and the knob."""
    progs = report["programs"]
    where = f"a {report['accelerator_type']} ({report['device_kind']}, {_gib(report['hbm_per_chip'])} HBM per chip)"
    bad = [p for p in progs if not p["fits"]]
    if not bad:
        top = max(progs, key=lambda p: p["share"])
        return (f"fits {where}: at most {_gib(top['needed'])} per chip ({100 * top['share']:.0f}%, "
                f"{top['name']})")
    p = bad[0]
    knobs = "; ".join(report["knobs"]) or "a smaller batch"
    needs = f"at least {_gib(p['needed'])}" if p["memory"] is None else _gib(p["needed"])
    return (f"{report['recipe']} does not fit {where}: {p['name']} needs {needs} of HBM per chip, "
            f"{_gib(p['available'])} available; lower it with {knobs}")


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report: per program, HBM by kind, compile time and XLA's estimate."""
    r = report
    lines = [f"preflight {r['recipe']} for {r['accelerator_type']} ({r['topology']}: {r['chips']} chips, "
             f"{r['hosts']} host{'s' if r['hosts'] > 1 else ''}, {r['device_kind']}, {_gib(r['hbm_per_chip'])} HBM "
             f"per chip; mesh {r['mesh']}; jax {r['jax']}, libtpu {r['libtpu']})"
             + (" [cached]" if r.get("cached") else "")]
    lines.append("  " + ", ".join(f"{k} {v}" for k, v in r["facts"].items()))
    for p in r["programs"]:
        if p["memory"] is None:
            lines.append(f"  {p['name']:12s} DOES NOT FIT: its temporaries alone need {_gib(p['needed'])} per chip, "
                         f"{_gib(p['available'])} available (compile {p['compile_sec']:.1f} s)")
            continue
        m = p["memory"]
        lines.append(f"  {p['name']:12s} {_gib(m['peak'])} per chip ({100 * p['share']:.1f}% of HBM): arguments "
                     f"{_gib(m['argument'])}, outputs {_gib(m['output'])}, aliased {_gib(m['alias'])}, temporaries "
                     f"{_gib(m['temp'])}; compile {p['compile_sec']:.1f} s")
        e = p.get("estimate")
        if e:
            mfu = f", MFU {100 * e['mfu']:.0f}%" if "mfu" in e else ""
            lines.append(f"  {'':12s} XLA cost-model estimate (not a measurement): {e['seconds'] * 1e3:.1f} ms, "
                         f"{e['flops_per_chip'] / 1e12:.2f} TFLOP per chip{mfu}")
        if p.get("note"):
            lines.append(f"  {'':12s} {p['note']}")
    lines.append(verdict(r))
    return "\n".join(lines)


def main(recipe: str, config: str | None, overrides: list[str], accelerator_type: str, as_json: bool,
         use_cache: bool, estimate: bool = True) -> int:
    """`python -m mllm_jax preflight`: print the report; exit 0 when every program fits, 1 when not."""
    report = run(recipe, config, overrides, accelerator_type, use_cache, estimate)
    print(json.dumps(report, indent=2) if as_json else format_report(report), flush=True)
    return 0 if report["fits"] else 1
