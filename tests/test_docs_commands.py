"""Every `mllm ...` command line quoted in the README, docs/ and sops/ still parses: each runs
with `--help` (before any `--`), so the command path and every option named must exist, and
nothing touches a cloud or a worker."""

from __future__ import annotations

import re
import shlex

import pytest
from typer.testing import CliRunner

from conftest import REPO
from launcher.cli import app

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "sops").glob("*.md"))]
_INLINE = re.compile(r"`(mllm [^`]+)`")


def quoted_commands() -> list[tuple[str, str]]:
    """(where, command line) for each `mllm ...` in backticks or at the start of a code-block line."""
    found = []
    for doc in DOCS:
        in_code = False
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_code = not in_code
                continue
            texts = [line.split(" #")[0].strip()] if in_code and line.startswith("mllm ") else _INLINE.findall(line)
            found += [(f"{doc.relative_to(REPO)}:{n}", t) for t in texts if t.strip() != "mllm"]
    return found


COMMANDS = quoted_commands()


def test_the_docs_quote_many_commands():
    assert len(COMMANDS) > 40 and any("vm create" in c for _, c in COMMANDS)


@pytest.mark.parametrize("where, line", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_quoted_command_parses(where, line, monkeypatch, tmp_path):
    # Should a quoted option lack its value (so that --help became the value), the command would
    # run: let it reach nothing but a closed local port, in an empty directory.
    monkeypatch.setenv("MLLM_TPU_API_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(line)[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    result = CliRunner().invoke(app, [*argv[:cut], "--help"])
    assert result.exit_code == 0 and "usage:" in result.output.lower(), f"{where}: `{line}` -> {result.output}"
