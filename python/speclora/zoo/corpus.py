"""Offline text corpora for the shipped model pair, split by document.

Two domains: ``code`` (the Python standard library's own ``.py`` sources) and
``prose`` (the Python documentation's reStructuredText sources). Whole documents
go to one split, chosen by a hash of their relative path, so held-out prompts and
losses never see text the models trained on.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

DOMAINS = ("prose", "code")
SPLITS = ("train", "prompt-train", "eval")

DOCS_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
"""Where Debian's ``python3.11-doc`` installs the documentation sources."""

HELDOUT_PER_MILLE = 150
"""Share of documents (per thousand) held out from training."""

# Directory names whose contents are test suites or third-party code, not stdlib.
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


@dataclass(frozen=True)
class Document:
    """One source document.

    Args:
        domain (str): ``"prose"`` or ``"code"``.
        name (str): Path relative to the corpus root, with ``/`` separators.
        text (str): The document's text.
    """

    domain: str
    name: str
    text: str

    @property
    def split(self) -> str:
        """The split this document belongs to: see :func:`split_of`."""
        return split_of(self.domain, self.name)


def split_of(domain: str, name: str) -> str:
    """Assign a document to ``"train"``, ``"prompt-train"`` or ``"eval"``.

    The assignment depends only on the domain and relative path, so it is the same
    on every machine and every run.

    Args:
        domain (str): The document's domain.
        name (str): The document's relative path.

    Returns:
        str: The split name.
    """
    digest = hashlib.sha256(f"{domain}/{name}".encode()).digest()
    bucket = int.from_bytes(digest[:4], "little") % 1000
    if bucket >= HELDOUT_PER_MILLE:
        return "train"
    # An independent byte of the digest halves the held-out documents.
    return "eval" if digest[4] % 2 == 0 else "prompt-train"


def code_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _read_utf8(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def load_code() -> list[Document]:
    """Read the standard library's Python sources, excluding test suites.

    Returns:
        list[Document]: Documents sorted by relative path.
    """
    root = code_root()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        text = _read_utf8(path)
        if text and text.strip():
            docs.append(Document("code", rel.as_posix(), text))
    return docs


def load_prose() -> list[Document]:
    """Read the Python documentation sources.

    Falls back to the help topics bundled in ``pydoc_data`` (one document per
    topic) when Debian's ``python3.11-doc`` is not installed.

    Returns:
        list[Document]: Documents sorted by name.
    """
    if DOCS_SOURCES.is_dir():
        docs = []
        for path in sorted(DOCS_SOURCES.rglob("*.rst.txt")):
            text = _read_utf8(path)
            if text and text.strip():
                docs.append(
                    Document("prose", path.relative_to(DOCS_SOURCES).as_posix(), text)
                )
        if docs:
            return docs
    from pydoc_data.topics import topics

    return [
        Document("prose", f"pydoc_data/{key}", text)
        for key, text in sorted(topics.items())
        if text.strip()
    ]


def prose_source() -> str:
    """Describe where :func:`load_prose` reads from, for the manifest."""
    return str(DOCS_SOURCES) if DOCS_SOURCES.is_dir() else "pydoc_data.topics"


def load_corpus(domain: str) -> list[Document]:
    """Load one domain's documents.

    Args:
        domain (str): ``"prose"`` or ``"code"``.

    Returns:
        list[Document]: The documents, in a deterministic order.
    """
    if domain == "code":
        return load_code()
    if domain == "prose":
        return load_prose()
    raise ValueError(f"Unknown domain {domain!r}; expected one of {DOMAINS}")


def corpus_digest(docs: list[Document]) -> str:
    """SHA-256 of the documents' UTF-8 texts concatenated in order."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc.text.encode("utf-8"))
    return h.hexdigest()
