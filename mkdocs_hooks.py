"""mkdocs hooks: the site's home page is README.md, and links that leave docs/ point at the repository.

README.md links to docs/*.md, benchmarks/ and examples/ as GitHub shows them; the pages in docs/ link
to ../benchmarks/... . mkdocs only knows the files under docs/, so such links become links into the
repository (repo_url in mkdocs.yml) or, without one, plain text.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _outside(target: str, config) -> str | None:
    """The repository URL for a link target outside docs/, or "" (no repo_url); None for other links."""
    if re.match(r"[a-z]+:|#", target):
        return None
    if target.startswith("../"):
        path = target[3:]
    else:
        return None
    repo = (config.get("repo_url") or "").rstrip("/")
    return f"{repo}/blob/main/{path}" if repo else ""


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "index.md":
        # README's links are relative to the repository's root; the index page sits in docs/.
        markdown = README.read_text()
        markdown = _LINK.sub(lambda m: f"{m[1]}[{m[2]}]({_from_root(m[3])})", markdown)

    def fix(match):
        url = _outside(match[3], config)
        if url is None:
            return match[0]
        return f"{match[1]}[{match[2]}]({url})" if url else match[2]

    return _LINK.sub(fix, markdown)


def _from_root(target: str) -> str:
    if re.match(r"[a-z]+:|#", target):
        return target
    if target.startswith("docs/"):
        return target[len("docs/"):]
    return "../" + target
