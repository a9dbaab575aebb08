"""The README and docs/*.md are true: every python block in them runs as written (and docs' bash blocks too)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
DOCS = sorted((README.parent / "docs").glob("*.md"))
# (page, language, index, code); blocks that load the real SmolLM2 (~15 s) or start the CLI run with -m slow
# Blocks that use TRL (an optional extra) are skipped where it is not installed.
NO_TRL = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs trl (pip install -e .[trl])")
DOC_BLOCKS = [pytest.param(doc, lang, i, code, id=f"{doc.name}-{lang}-{i}",
                           marks=([pytest.mark.slow] if lang == "bash" or "smollm2" in code else [])
                           + ([NO_TRL] if "import trl" in code else []))
              for doc in DOCS
              for i, (lang, code) in enumerate(re.findall(r"```(python|bash)\n(.*?)```", doc.read_text(), flags=re.S))]


# A "# <text>" comment on a print line (python) or a command line (bash) claims the output.
PYTHON_CLAIM = r"^print\(.*\)\s+# (.+)$"
BASH_CLAIM = r"^(?!#)\S[^\n]*?[ \t]+# (.+)$"


def _check_claims(code: str, printed: str, page: str, pattern: str) -> None:
    # a trailing "(...)" in a claim explains it and is not part of the output
    for claim in re.findall(pattern, code, flags=re.M):
        claim = claim.split(" (")[0]
        assert claim.strip() in printed, f"{page} claims {claim!r}, printed {printed!r}"


def _run_python(code: str, page: str) -> None:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, page, "exec"), {"__name__": "__readme__"})
    _check_claims(code, printed.getvalue(), page, PYTHON_CLAIM)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run_python(BLOCKS[index], f"README.md block {index}")


@pytest.mark.parametrize("doc, lang, index, code", DOC_BLOCKS)
def test_docs_block_runs(doc, lang, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    page = f"docs/{doc.name} {lang} block {index}"
    if lang == "python":
        _run_python(code, page)
        return
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{page}: {done.stderr[-3000:]}"
    _check_claims(code, done.stdout, page, BASH_CLAIM)
