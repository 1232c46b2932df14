"""Typed configs: a YAML file plus `--set a.b=value` overrides, checked against dataclasses.

Each recipe declares one dataclass tree (levanter style); this module turns YAML into it and
refuses anything it does not understand, so a typo never silently trains the wrong model.
A YAML file may start from another one with `base: other.yaml` (path relative to the file).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml

from mllm_jax.contracts import control_chars


class ConfigError(ValueError):
    """Bad user input: reported as one line, exit code 2, no traceback."""


T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Bound:
    """A lower bound declared on a field, `Annotated[int, Positive]`: checked when the config is
    built, and the error names the full dotted key."""

    low: float
    inclusive: bool

    def check(self, value: Any, key: str) -> None:
        if value < self.low or (value == self.low and not self.inclusive):
            what = "an integer" if isinstance(value, int) else "a number"
            want = (f"a positive {what.split()[-1]}" if self.low == 0 and not self.inclusive
                    else f"{what} {'>=' if self.inclusive else '>'} {self.low:g}")
            raise ConfigError(f"{key}: expected {want}, got {value!r}")


Positive = Bound(0, inclusive=False)
NonNegative = Bound(0, inclusive=True)
PositiveInt = Annotated[int, Positive]
NonNegativeInt = Annotated[int, NonNegative]
PositiveFloat = Annotated[float, Positive]
NonNegativeFloat = Annotated[float, NonNegative]


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Build `cls` from its defaults, then the YAML file at `path`, then `key=value` overrides."""
    raw: dict[str, Any] = _read_yaml(Path(path)) if path else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=100")
        if control_chars(item):
            raise ConfigError(f"--set {item!r}: control characters ({', '.join(control_chars(item))}) are not "
                              "allowed; give one KEY=VALUE per --set")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({_first_line(e)}); "
                              "quote a string, e.g. key='[1, 2'") from None
        _assign(raw, key.strip().split("."), parsed)
    return _build(cls, raw, prefix="")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    text = read_text_file(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_first_line(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml(path.parent / str(base), seen + (path.resolve(),))
    _merge(merged, data)
    return merged


def read_text_file(path: str | Path) -> str:
    """A file the user named (config, data, env file), as UTF-8 text. A binary file (not UTF-8,
    or with NUL bytes) or an unreadable one is a ConfigError whose message starts with the path,
    so that callers may put their key or flag in front."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    if "\0" in text:
        raise ConfigError(f"{path}: not a text file (it has NUL bytes)")
    return text


def _first_line(e: Exception) -> str:
    return " ".join(str(e).split("\n")[0].split())


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        else:
            dst[key] = value


def _assign(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        raw = raw.setdefault(key, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: {key} is not a section")
    raw[keys[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    values = {}
    for name in names:
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], prefix + name)
        elif dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], {}, prefix + name + ".")
    obj = cls(**values)
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *meta = typing.get_args(tp)
        value = _coerce(base, value, key)
        for bound in meta:
            if isinstance(bound, Bound):
                bound.check(value, key)
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads `3e-4` as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # NaN passes every bound check and trains to NaN
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"{key}: unsupported config type {tp!r}")
    raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data, in declaration order (for YAML dumps, W&B and hashing)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# Where a run writes, not how it trains: left out of the hash, so equal settings share one.
PER_RUN_KEYS = ("output_dir",)


RESUME_MAY_CHANGE = (
    "output_dir", "run_mode", "wandb", "sample", "eval", "jax.mesh_shape", "jax.distributed_timeout_sec",
    "data.eval_file", "data.sample_eval", "data.test_file", "data.sample_test",
    "train.log_every", "train.eval_every", "train.eval_iters", "train.checkpoint_every", "train.keep_checkpoints",
    "train.checkpoint_dir", "train.best_metric", "train.load_best_model_at_end", "train.early_stopping_patience",
    "train.max_steps", "train.num_train_epochs",
    "train.per_device_train_batch_size", "train.gradient_checkpointing", "train.loss_chunk_size",
    "train.scan_layers", "train.attention",
)
"""Keys (and sections) a --resume may change freely: where a run writes and reports, what it
evaluates, how long it trains, and how a step is computed (micro-batches, remat, kernels, the
mesh) but not what it computes. Any other change (the model, the data and its order, dtypes,
the optimizer) is refused unless the resume names it (`--allow-config-change KEY`)."""


def resume_changes(recorded: dict[str, Any], now: dict[str, Any], allowed: tuple[str, ...] = ()) -> list[str]:
    """`key: old -> new` for every setting that differs between the config a checkpoint was
    saved with and this one, other than RESUME_MAY_CHANGE and `allowed`. Both are compared as
    the checkpoint stores them (JSON: a tuple reads back as a list)."""
    old, new = _flat(json.loads(json.dumps(recorded))), _flat(json.loads(json.dumps(now)))
    free = RESUME_MAY_CHANGE + tuple(allowed)
    return [f"{key}: {old.get(key, '(none)')!r} -> {new.get(key, '(none)')!r}" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key) and not any(key == k or key.startswith(k + ".") for k in free)]


def check_keys(settings: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    """Refuse a dotted key that names neither a setting nor a section of `settings` (a typo in
    --allow-config-change must not pass as permission for nothing)."""
    flat = _flat(settings)
    for key in keys:
        if key not in flat and not any(k.startswith(key + ".") for k in flat):
            close = difflib.get_close_matches(key, list(flat), n=1)
            raise ConfigError(f"{what} {key}: no such config key" + (f"; did you mean {close[0]}?" if close else ""))


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_hash(cfg: Any) -> str:
    """Short stable hash of the resolved settings, to tell runs with equal settings apart."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in PER_RUN_KEYS}
    return hashlib.sha256(yaml.safe_dump(settings, sort_keys=False).encode()).hexdigest()[:16]
