"""Hub ids in `base_model` (mllm_jax.models.hf.resolve_model_dir), without network: a fake
huggingface_hub.snapshot_download that "downloads" a repo's files matching allow_patterns."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

from mllm_jax.config import ConfigError
from mllm_jax.models import hf

REPO_FILES = ["config.json", "model.safetensors", "README.md",
              "sft/Industrial/config.json", "sft/Industrial/model.safetensors", "sft/Industrial/tokenizer.json",
              "sft/Industrial/optimizer.pt", "sft/Office/config.json", "rl/Industrial/tokenizer.json"]


@pytest.fixture
def hub(tmp_path, monkeypatch) -> list[tuple[str, list[str]]]:
    """The (repo_id, allow_patterns) of every download; the snapshot of repo X is tmp_path/X."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id: str, *, allow_patterns: list[str], **_) -> str:
        calls.append((repo_id, list(allow_patterns)))
        if repo_id != "org/repo":
            raise RuntimeError(f"404 Client Error: Repository Not Found for url: .../{repo_id}\nmore text")
        snapshot = tmp_path / repo_id
        for name in REPO_FILES:  # huggingface_hub matches patterns with fnmatchcase
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in allow_patterns):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                (snapshot / name).write_text("{}")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def test_a_subfolder_of_a_repo_downloads_only_its_files(hub, tmp_path):
    model_dir = hf.resolve_model_dir("org/repo/sft/Industrial")
    assert hub == [("org/repo", [f"sft/Industrial/{p}" for p in hf.HUB_FILES])]
    assert model_dir == tmp_path / "org/repo/sft/Industrial"
    assert files_under(tmp_path / "org/repo") == ["sft/Industrial/config.json", "sft/Industrial/model.safetensors",
                                                   "sft/Industrial/tokenizer.json"]
    hf.resolve_model_dir("org/repo/sft/Industrial/", hf.CONFIG_FILES)  # preflight's files; a trailing slash
    assert hub[1] == ("org/repo", [f"sft/Industrial/{p}" for p in hf.CONFIG_FILES])


def test_a_whole_repo_as_before(hub, tmp_path):
    assert hf.resolve_model_dir("org/repo") == tmp_path / "org/repo"
    assert hub == [("org/repo", hf.HUB_FILES)]
    assert "README.md" not in files_under(tmp_path / "org/repo")


@pytest.mark.parametrize("base_model, message", [
    ("org/repo/rl/Industrial", "base_model 'org/repo/rl/Industrial': no rl/Industrial/config.json in the "
                               "Hugging Face repo org/repo"),
    ("org/repo/nope", "base_model 'org/repo/nope': no nope/config.json in the Hugging Face repo org/repo"),
    ("org/other/sub", "base_model 'org/other/sub': not a local directory, and the Hugging Face Hub download failed "
                      "(404 Client Error: Repository Not Found for url: .../org/other)"),
    ("./nope", "base_model './nope': no such directory"),
    ("/no/such/dir", "base_model '/no/such/dir': no such directory"),
    ("~/no/such/dir", "base_model '~/no/such/dir': no such directory"),
])
def test_one_line_errors(hub, base_model, message):
    with pytest.raises(ConfigError) as e:
        hf.resolve_model_dir(base_model)
    assert str(e.value) == message
    assert not base_model.startswith(("/", ".", "~")) or hub == []  # a local path never reaches the hub


def test_a_mistyped_run_export_is_a_missing_directory_not_a_hub_repo(hub, tmp_path, monkeypatch):
    (tmp_path / "runs" / "sft-1").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        hf.resolve_model_dir("runs/sft-2/hf")
    assert str(e.value) == "base_model 'runs/sft-2/hf': no such directory" and hub == []


def test_a_local_directory_is_used_as_is(hub, tmp_path):
    local = tmp_path / "a" / "b" / "c"
    local.mkdir(parents=True)
    assert hf.resolve_model_dir(str(local)) == local and hub == []
