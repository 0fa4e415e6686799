"""Real text from installed packages, read by path (the packages are never imported).

wikipedia: the Wikipedia articles dump shipped in the gensim wheel's test data, markup stripped.
"""

from __future__ import annotations

import bz2
import functools
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


@functools.lru_cache(maxsize=4)
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


PYDOC_DIRS = ("/usr/share/doc/python3.11/html/_sources", "/usr/share/doc/python3-doc/html/_sources")


def _rst_to_text(text: str) -> str:
    text = re.sub(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", text)  # :func:`name` -> name
    text = re.sub(r"^\s*\.\. .*$", "", text, flags=re.M)  # directives
    text = re.sub(r"^[=\-~^*#+\"']{3,}\s*$", "", text, flags=re.M)  # heading underlines
    text = text.replace("``", "")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def python_docs(max_docs: int = 400, min_chars: int = 2000) -> tuple[str, list[tuple[str, str]]]:
    """(source description, [(name, text)]) of technical text full of rare terms.

    Prefers the Python documentation from Debian's python3.11-doc (reST sources shipped as .txt);
    without it, falls back to the docstrings of the standard library's own modules.
    """
    for d in PYDOC_DIRS:
        root = Path(d)
        files = sorted(root.glob("library/*.txt")) if root.is_dir() else []
        if files:
            docs = []
            for f in files:
                body = _rst_to_text(f.read_text(errors="replace"))
                if len(body) >= min_chars:
                    docs.append((f"library/{f.name.removesuffix('.rst.txt').removesuffix('.txt')}", body))
                if len(docs) == max_docs:
                    break
            return f"Python 3.11 documentation ({root})", docs
    return "standard library docstrings (install Debian python3.11-doc for the full documentation)", _stdlib_docstrings(max_docs, min_chars)


def _stdlib_docstrings(max_docs: int, min_chars: int) -> list[tuple[str, str]]:
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for f in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(f.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        parts = [ast.get_docstring(n) or "" for n in ast.walk(tree)
                 if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        body = "\n\n".join(p for p in parts if p)
        if len(body) >= min_chars:
            docs.append((f"stdlib/{f.stem}", body))
        if len(docs) == max_docs:
            break
    return docs


@functools.lru_cache(maxsize=2)
def common_words(min_count: int = 2) -> frozenset[str]:
    """Lower-cased words seen at least min_count times in the Wikipedia sample: 'ordinary' vocabulary."""
    counts: dict[str, int] = {}
    for w in re.findall(r"[A-Za-z]+", wikipedia_text(2_000_000)):
        w = w.lower()
        counts[w] = counts.get(w, 0) + 1
    return frozenset(w for w, c in counts.items() if c >= min_count)
