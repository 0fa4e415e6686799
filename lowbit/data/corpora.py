"""Real text from installed packages, read by path (the packages are never imported).

wikipedia: the Wikipedia articles dump shipped in the gensim wheel's test data, markup stripped.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from lowbit.errors import LowbitError

WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def package_file(package: str, rel: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(f"data package '{package}' is not installed; fix: {install_hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise LowbitError(f"data file {path} is missing from package '{package}'; fix: reinstall it ({install_hint})")
    return path


def _strip_wiki(text: str) -> str:
    text = html.unescape(text)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    for _ in range(3):  # nested templates, innermost first
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
    text = re.sub(r"\{\|.*?\|\}", "", text, flags=re.S)  # tables
    text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", text)
    text = re.sub(r"\[\[[^\]|]*\|([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[\[([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    lines = [ln.strip() for ln in text.splitlines()]
    keep = [ln for ln in lines if ln and "]]" not in ln and "[[" not in ln
            and not ln.startswith(("*", "#", "|", "!", "{", "}", ":", ";", ","))]
    return "\n".join(keep)


def wikipedia_articles(min_chars: int = 2000) -> list[tuple[str, str]]:
    """(title, plain text) of the real articles in the gensim wheel, redirects and stubs dropped."""
    path = package_file("gensim", WIKI_FILE, "pip install --no-deps gensim")
    out = []
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f):
            if elem.tag.endswith("page"):
                title = next((c.text for c in elem.iter() if c.tag.endswith("title")), "") or ""
                raw = next((c.text for c in elem.iter() if c.tag.endswith("text")), "") or ""
                elem.clear()
                if raw.lstrip().upper().startswith("#REDIRECT"):
                    continue
                body = _strip_wiki(raw)
                if len(body) >= min_chars:
                    out.append((title, body))
    return out


def wikipedia_text(max_chars: int = 200_000) -> str:
    parts, n = [], 0
    for title, body in wikipedia_articles():
        parts.append(f"{title}\n\n{body}")
        n += len(parts[-1])
        if n >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]
