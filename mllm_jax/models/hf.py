"""Hugging Face model directories in and out, without torch: config.json, safetensors
weights and tokenizer.json, for the Qwen2 and Llama families (models/qwen2.py).

A directory we write loads with `transformers.AutoModelForCausalLM/AutoTokenizer
.from_pretrained(dir)`; see docs of save_pretrained for what is kept from the source model.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding
from tokenizers import AddedToken, Tokenizer

from mllm_jax import runtime
from mllm_jax.config import ConfigError
from mllm_jax.models.qwen2 import Qwen2, Qwen2Config, param_specs

# What a model directory needs; everything else on the Hub (torch .bin files, ...) is skipped.
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
# Files copied from the source model directory by save_pretrained (tokenizer_config.json is rewritten).
_COPIED = ["generation_config.json", "special_tokens_map.json", "chat_template.jinja"]
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


CONFIG_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
"""What preflight reads of a model: its shapes and vocabulary, never its weights."""


def resolve_model_dir(base_model: str, files: list[str] | None = None) -> Path:
    """A local model directory as is, or a Hub id downloaded to the Hugging Face cache (weights, config
    and tokenizer only; `files`: only these patterns): "Qwen/Qwen2.5-0.5B", or "org/repo/sub/dir" for a
    model kept in a subfolder of a repo (as released MiniOneRec checkpoints are), of which only
    sub/dir's files are downloaded."""
    path = Path(base_model).expanduser()
    if path.is_dir():
        return path
    parts = base_model.strip("/").split("/")
    if base_model.startswith(("/", ".", "~")) or (len(parts) > 2 and Path(parts[0]).is_dir()):
        # a local path (e.g. runs/<run>/hf mistyped), not a hub repo
        raise ConfigError(f"base_model {base_model!r}: no such directory")
    from huggingface_hub import snapshot_download

    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    patterns = [f"{subfolder}/{p}" for p in files or HUB_FILES] if subfolder else files or HUB_FILES
    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"base_model {base_model!r}: not a local directory, and the Hugging Face Hub "
                          f"download failed ({reason})") from None
    model_dir = snapshot / subfolder
    if subfolder and not (model_dir / "config.json").is_file():
        raise ConfigError(f"base_model {base_model!r}: no {subfolder}/config.json in the Hugging Face repo {repo_id}")
    return model_dir


def _read_json(path: Path) -> dict:
    """A JSON object file of the model directory; anything else is a one-line ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected JSON)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# config.json keys that must be positive integers; the optional ones may also be null.
_POSITIVE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_OPTIONAL_POSITIVE_KEYS = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def load_config(model_dir: str | Path) -> Qwen2Config:
    """The Qwen2Config of a Hugging Face qwen2 or llama config.json. Features we do not
    implement (rope scaling, sliding windows, MLP biases) are refused, not ignored."""
    path = Path(model_dir) / "config.json"
    c = _read_json(path)
    model_type = c.get("model_type")
    if model_type not in ("qwen2", "llama"):
        raise ConfigError(f"{path}: model_type {model_type!r} is not supported (expected qwen2 or llama)")
    # transformers>=5 writes rope_parameters {"rope_theta", "rope_type"}; older files write
    # rope_theta at the top and rope_scaling (null unless scaled).
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{path}: rope type {rope_type!r} is not supported (only unscaled rope)")
    theta = c.get("rope_theta") or rope.get("rope_theta") or (1e6 if model_type == "qwen2" else 1e4)
    if c.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{path}: hidden_act {c['hidden_act']!r} is not supported (expected silu)")
    if c.get("use_sliding_window") or c.get("mlp_bias"):
        raise ConfigError(f"{path}: use_sliding_window / mlp_bias are not supported")
    for key in (*_POSITIVE_KEYS, *_OPTIONAL_POSITIVE_KEYS):
        value = c.get(key)
        if key not in c or (value is None and key in _OPTIONAL_POSITIVE_KEYS):
            continue  # missing: reported below; null: unset
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{path}: {key}: expected a positive integer, got {value!r}")
    try:
        return Qwen2Config(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
            num_key_value_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            head_dim=c.get("head_dim"), rms_norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            attention_bias=True if model_type == "qwen2" else bool(c.get("attention_bias", False)),
            max_position_embeddings=c.get("max_position_embeddings", 32768),
        )
    except KeyError as e:
        raise ConfigError(f"{path}: missing key {e.args[0]!r}") from None


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (only fast tokenizers, tokenizer.json, are supported)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"{path}: not a valid tokenizer.json ({reason})") from None


def eos_token_id(model_dir: str | Path, tokenizer: Tokenizer) -> int:
    """The id generation stops at: tokenizer_config.json's eos_token, else the
    eos_token_id of generation_config.json or config.json (the first, if a list)."""
    model_dir = Path(model_dir)
    tc = model_dir / "tokenizer_config.json"
    eos = _read_json(tc).get("eos_token") if tc.is_file() else None
    if isinstance(eos, dict):
        eos = eos.get("content")
    if isinstance(eos, str) and tokenizer.token_to_id(eos) is not None:
        return tokenizer.token_to_id(eos)
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        ids = _read_json(path).get("eos_token_id") if path.is_file() else None
        if isinstance(ids, list):
            ids = ids[0] if ids else None
        if isinstance(ids, int):
            return ids
    raise ConfigError(f"{model_dir}: no eos token in tokenizer_config.json, generation_config.json or config.json")


def add_tokens(tokenizer: Tokenizer, tokens: list[str]) -> int:
    """Add `tokens` as ordinary (non-special) whole tokens, as HF tokenizer.add_tokens does;
    ones already in the vocabulary are skipped. Returns how many were new."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    taken = next((t for t in tokens if t in special), None)
    if taken is not None:
        raise ConfigError(f"data.sid_index_path: SID token {taken!r} is a special token of the model's tokenizer; "
                          "SID tokens must be new ordinary tokens")
    new = [t for t in dict.fromkeys(tokens) if t not in vocab]
    return tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in new])


def padded_vocab(vocab_size: int, mesh: Mesh) -> int:
    """vocab_size rounded up to a multiple of 128 * tp: the vocab dimension then splits
    evenly over the tp devices, and each shard is a whole number of 128-wide TPU lanes."""
    multiple = 128 * mesh.shape["tp"]
    return -(-vocab_size // multiple) * multiple


# ----------------------------------------------------------------------------- weights

def hf_name(path: tuple[str, ...]) -> str:
    """Our parameter path -> its Hugging Face weight name,
    e.g. (layers_3, self_attn, q_proj, kernel) -> model.layers.3.self_attn.q_proj.weight."""
    *modules, leaf = path
    name = ".".join(m.replace("layers_", "layers.") for m in modules)
    return ("" if name == "lm_head" else "model.") + name + (".bias" if leaf == "bias" else ".weight")


def _open_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Name -> array of one .safetensors file, memory-mapped: only the slices read are loaded.
    Our own reader because safetensors' numpy backend cannot return bfloat16. The header is
    checked against the file's size, so a corrupt or truncated file is a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (named by model.safetensors.index.json)")

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{path}: not a valid safetensors file ({why})")

    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > size - 8:
            raise bad(f"a header of {n} bytes in a file of {size}: truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if data_len else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {name}: expected dtype, shape and data_offsets") from None
        if dtype not in _DTYPES:
            raise ConfigError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end) or min(shape, default=0) < 0:
            raise bad(f"tensor {name}: bad shape {shape} or data_offsets {[start, end]}")
        if end > data_len:
            raise bad(f"tensor {name} ends at byte {end} of {data_len}: the file is truncated")
        if end - start != math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize:
            raise bad(f"tensor {name}: {end - start} bytes do not hold shape {shape} of {dtype}")
        out[name] = data[start:end].view(_DTYPES[dtype]).reshape(shape)
    return out


def _read_weights(model_dir: Path) -> dict[str, np.ndarray]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ConfigError(f"{index}: expected a weight_map of weight name -> file name")
        files = sorted(set(weight_map.values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    weights = {}
    for f in files:
        weights.update(_open_safetensors(model_dir / f))
    return weights


def _resize_rows(w: np.ndarray, vocab_size: int, padded: int) -> np.ndarray:
    """(rows, D) -> (padded, D): existing rows kept (or cut) up to vocab_size, rows past
    the checkpoint's set to the mean row (HF's mean_resizing, without its noise), and
    zeros for the padding."""
    out = np.zeros((padded, w.shape[1]), np.float32)
    n = min(len(w), vocab_size)
    out[:n] = w[:n]
    if vocab_size > len(w):
        out[len(w):vocab_size] = np.asarray(w, np.float32).mean(axis=0)
    return out


def abstract_params(cfg: Qwen2Config, param_dtype=np.float32):
    """Shapes (and dtypes) of the model's parameters, without allocating them."""
    model = Qwen2(cfg, param_dtype=param_dtype)
    return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1), np.int32))["params"]


def _resized(keys: tuple[str, ...]) -> bool:
    """The embedding and the head: their rows follow the (resized, padded) vocabulary."""
    return keys[-1] in ("embedding", "kernel") and keys[0] in ("embed_tokens", "lm_head")


def _param_shape(keys: tuple[str, ...], hf_shape: tuple[int, ...], cfg: Qwen2Config) -> tuple[int, ...]:
    """The shape our parameter `keys` gets from a Hugging Face weight of `hf_shape`."""
    shape = tuple(hf_shape)
    if _resized(keys) and len(shape) == 2:
        shape = (cfg.padded_vocab_size, shape[1])
    return shape[::-1] if keys[-1] == "kernel" else shape  # torch Linear (out, in) -> (in, out)


@dataclass
class Weights:
    """A checkpoint's weights, memory-mapped (nothing read yet) and checked against `cfg`."""

    model_dir: Path
    arrays: dict[str, np.ndarray]
    """Hugging Face weight name -> array."""
    cfg: Qwen2Config
    """load_config's, with vocab_size and padded_vocab_size set."""


def open_weights(model_dir: str | Path, cfg: Qwen2Config, mesh: Mesh, vocab_size: int | None = None) -> Weights:
    """Open the safetensors of `model_dir` and check that every parameter of `cfg` is there
    with the shape config.json implies (ConfigError otherwise), without loading them.

    `vocab_size` (e.g. the tokenizer's size after add_tokens) resizes the vocabulary like HF
    resize_token_embeddings (see _resize_rows); by default the checkpoint's. The returned cfg
    has that vocab_size and padded_vocab_size = padded_vocab(vocab_size, mesh)."""
    model_dir = Path(model_dir)
    arrays = _read_weights(model_dir)
    embed = arrays.get("model.embed_tokens.weight")
    vocab_size = vocab_size or (len(embed) if embed is not None else cfg.vocab_size)
    cfg = replace(cfg, vocab_size=vocab_size, padded_vocab_size=padded_vocab(vocab_size, mesh))
    for path, shape in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]:
        keys = tuple(str(k.key) for k in path)
        name = hf_name(keys)
        if name not in arrays:
            raise ConfigError(f"{model_dir}: weight {name} not found in the checkpoint")
        found = _param_shape(keys, arrays[name].shape, cfg)
        if found != shape.shape:
            raise ConfigError(f"{model_dir}: weight {name} has shape {found}, config.json implies {shape.shape}")
    return Weights(model_dir, arrays, cfg)


def place_params(weights: Weights, mesh: Mesh, param_dtype=np.float32) -> dict:
    """The opened weights as our params, each placed straight into its sharding (a process
    only reads and transfers its own devices' slices), in param_dtype."""
    cfg = weights.cfg
    shapes = abstract_params(cfg)
    dtype = np.dtype(param_dtype)

    def load(path, shape, spec):
        keys = tuple(str(k.key) for k in path)
        w = weights.arrays[hf_name(keys)]
        if _resized(keys):
            w = _resize_rows(w, cfg.vocab_size, cfg.padded_vocab_size)
        if keys[-1] == "kernel":
            w = w.T
        return jax.make_array_from_callback(shape.shape, NamedSharding(mesh, spec),
                                            lambda idx: np.ascontiguousarray(w[idx], dtype=dtype))

    return jax.tree_util.tree_map_with_path(load, shapes, param_specs(shapes, mesh))


def load_params(model_dir: str | Path, cfg: Qwen2Config, mesh: Mesh, param_dtype=np.float32,
                vocab_size: int | None = None) -> tuple[dict, Qwen2Config]:
    """open_weights then place_params: the checkpoint's weights as our params, and the cfg
    with vocab_size and padded_vocab_size set (see open_weights)."""
    weights = open_weights(model_dir, cfg, mesh, vocab_size)
    return place_params(weights, mesh, param_dtype), weights.cfg


def save_pretrained(out_dir: str | Path, params: dict, cfg: Qwen2Config, tokenizer: Tokenizer,
                    source_dir: str | Path, dtype: str = "bfloat16") -> None:
    """Write a Hugging Face model directory: model.safetensors (HF names, vocab padding
    dropped), config.json (source_dir's, with vocab_size and dtype updated), tokenizer.json
    (added tokens included), tokenizer_config.json (source's, with every added token listed),
    and the source's generation_config.json etc. Every process must call it (sharded params
    are gathered); only process 0 writes. out_dir may be source_dir."""
    if dtype not in ("bfloat16", "float32"):
        raise ConfigError(f"save dtype: expected bfloat16 or float32, got {dtype!r}")
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    tensors = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(str(k.key) for k in path)
        w = runtime.to_host(x)
        if keys[-1] == "kernel":
            w = w.T
        if keys[0] in ("embed_tokens", "lm_head"):
            w = w[: cfg.vocab_size]
        tensors[hf_name(keys)] = np.ascontiguousarray(w.astype(np_dtype))
    if jax.process_index() != 0:
        return

    from safetensors.numpy import save_file

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    config = _read_json(source_dir / "config.json")
    tok_config_path = source_dir / "tokenizer_config.json"
    tok_config = _read_json(tok_config_path) if tok_config_path.is_file() else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in _COPIED:
        if (source_dir / name).is_file() and source_dir.resolve() != out_dir.resolve():
            shutil.copy(source_dir / name, out_dir / name)

    # "torch_dtype" is transformers<5's name for "dtype".
    config.update(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_word_embeddings, dtype=dtype,
                  torch_dtype=dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Transformers may build the tokenizer from its vocabulary plus this list, not tokenizer.json.
    tok_config["added_tokens_decoder"] = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    tokenizer.save(str(out_dir / "tokenizer.json"))
    for stale in ["model.safetensors.index.json", *(p.name for p in out_dir.glob("model-*.safetensors"))]:
        (out_dir / stale).unlink(missing_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


@dataclass
class OpenedModel:
    """A model directory opened for fine-tuning with extra tokens (e.g. MiniOneRec's SID tokens)."""

    model_dir: Path
    tokenizer: Tokenizer
    """With the tokens added."""
    eos_id: int
    weights: Weights
    """Opened (memory-mapped) with the vocabulary grown to the tokenizer's size."""
    token_extension: dict[str, int]
    """What adding the tokens did: sid_tokens, added_tokens, tokenizer_size_before,
    embedding_rows_before, vocab_size (the run summary's `token_extension`)."""


def open_with_tokens(base_model: str, tokens: list[str], mesh: Mesh) -> OpenedModel:
    """Resolve `base_model` (a directory or hub id), add `tokens` to its tokenizer as whole ordinary
    tokens (those already there are kept, e.g. a model fine-tuned with them before) and open its
    weights with the vocabulary grown to the tokenizer's size (new rows at the mean, see
    open_weights). Bad files are one-line ConfigErrors; nothing is loaded yet."""
    model_dir = resolve_model_dir(base_model)
    model_cfg = load_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    eos_id = eos_token_id(model_dir, tokenizer)
    vocab_before = tokenizer.get_vocab_size(with_added_tokens=True)
    added = add_tokens(tokenizer, tokens)
    extension = {"sid_tokens": len(tokens), "added_tokens": added, "tokenizer_size_before": vocab_before,
                 "embedding_rows_before": model_cfg.vocab_size,
                 "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True)}
    weights = open_weights(model_dir, model_cfg, mesh, vocab_size=extension["vocab_size"])
    return OpenedModel(model_dir, tokenizer, eos_id, weights, extension)


def config_with_tokens(base_model: str, tokens: list[str] | None, mesh: Mesh) -> tuple[Path, Qwen2Config, Tokenizer]:
    """open_with_tokens from config.json and the tokenizer alone (what preflight reads; no weights):
    (model dir, config with the vocabulary grown to the tokenizer with `tokens` added and padded for
    `mesh`, that tokenizer). `tokens` None keeps config.json's vocab_size."""
    model_dir = resolve_model_dir(base_model, CONFIG_FILES)
    cfg = load_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    vocab = cfg.vocab_size
    if tokens is not None:
        add_tokens(tokenizer, tokens)
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    return model_dir, replace(cfg, vocab_size=vocab, padded_vocab_size=padded_vocab(vocab, mesh)), tokenizer
