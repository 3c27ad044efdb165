"""mkdocs hooks: links from a docs page to repository files outside docs/ (benchmarks/, data/, configs/).

mkdocs validates relative links against the documentation files only, so `../benchmarks/README.md` is "not
found" to it, and its `validation.links.not_found` level would have to drop for every link, including broken
ones between pages. Instead, a link that leaves docs/ is checked here against the checkout (a missing file stops
the build, naming the page and the link) and hidden from mkdocs' check behind a scheme; the page gets the same
relative link back. With `use_directory_urls: false` and the site at the repository root (`site/<page>.html`),
that link reaches the repository file from the built site as it does from docs/<page>.md.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

SCHEME = "apo-ray-repository:"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _leaves_docs(page_src_uri: str, target: str) -> str | None:
    """The target's path relative to the docs directory when it points outside it; None otherwise."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return None
    path = posixpath.normpath(posixpath.join(posixpath.dirname(page_src_uri), target.split("#", 1)[0]))
    return path if path.startswith("../") else None


def on_page_markdown(markdown, page, config, files):
    docs_dir = Path(config["docs_dir"])

    def hide(match: re.Match) -> str:
        target = match.group(1)
        path = _leaves_docs(page.file.src_uri, target)
        if path is None:
            return match.group(0)
        if not (docs_dir / path).exists():
            raise PluginError(
                f"docs/{page.file.src_uri} links to '{target}', which is not a file of the repository "
                f"({(docs_dir / path).resolve()} does not exist)"
            )
        return f"]({SCHEME}{target})"

    return LINK.sub(hide, markdown)


def on_page_content(html, page, config, files):
    return html.replace(f'href="{SCHEME}', 'href="')
