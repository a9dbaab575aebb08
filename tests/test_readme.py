"""The README is true: every python block in it runs as written."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = BLOCKS[index]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "__readme__"})
    # A "# <text>" comment on a print line claims the output (a trailing "(...)" explains it).
    for claim in re.findall(r"^print\(.*\)\s+# (.+)$", code, flags=re.M):
        claim = claim.split(" (")[0]
        assert claim.strip() in printed.getvalue(), f"README claims {claim!r}, printed {printed.getvalue()!r}"
