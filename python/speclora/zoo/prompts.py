"""Held-out prompts: short passages of held-out documents that start at a line."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from speclora.zoo.corpus import Document

PROMPT_SPLITS = {"prompt-train": "train", "eval": "eval"}
"""Document split -> prompt split: prompt sets come only from held-out documents."""


def _candidates(
    doc: Document,
    count_tokens: Callable[[str], int],
    *,
    min_tokens: int,
    max_tokens: int,
    min_continuation: int,
) -> list[tuple[int, str]]:
    """Non-overlapping (line number, text) passages of whole lines.

    A passage starts at a non-blank line, grows line by line until it holds at
    least ``min_tokens`` tokens, and is dropped if it exceeds ``max_tokens`` or if
    fewer than ``min_continuation`` characters of the document follow it.
    """
    lines = doc.text.splitlines(keepends=True)
    offsets = np.cumsum([0] + [len(line) for line in lines])
    out = []
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        j = i
        text = ""
        n = 0
        while j < len(lines) and n < min_tokens:
            text += lines[j]
            j += 1
            n = count_tokens(text)
        enough_left = len(doc.text) - offsets[j] >= min_continuation
        if min_tokens <= n <= max_tokens and enough_left and len(text.strip()) > 0:
            out.append((i + 1, text))
            i = j
        else:
            i += 1
    return out


def make_prompts(
    docs: list[Document],
    count_tokens: Callable[[str], int],
    *,
    per_split: dict[str, int],
    min_tokens: int = 24,
    max_tokens: int = 64,
    min_continuation: int = 256,
    seed: int = 0,
) -> list[dict]:
    """Pick prompts from held-out documents, spread evenly across documents.

    Args:
        docs (list[Document]): One domain's documents (all splits; only held-out
            ones are used).
        count_tokens (Callable[[str], int]): Token count of a text, without BOS.
        per_split (dict[str, int]): Prompt split (``"train"``/``"eval"``) -> how many.
        min_tokens (int): Minimum prompt length in tokens. Default: ``24``.
        max_tokens (int): Maximum prompt length in tokens. Default: ``64``.
        min_continuation (int): Characters of the document that must follow a
            prompt. Default: ``256``.
        seed (int): Seed of the per-document shuffle. Default: ``0``.

    Returns:
        list[dict]: ``{"id", "prompt", "split", "doc"}`` records, eval first.
    """
    records = []
    for doc_split, prompt_split in sorted(PROMPT_SPLITS.items(), key=lambda kv: kv[1]):
        wanted = per_split[prompt_split]
        pools = []
        for doc in docs:
            if doc.split != doc_split:
                continue
            cands = _candidates(
                doc,
                count_tokens,
                min_tokens=min_tokens,
                max_tokens=max_tokens,
                min_continuation=min_continuation,
            )
            key = hashlib.sha256(f"{seed}/{doc.domain}/{doc.name}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
            order = rng.permutation(len(cands))
            pools.append((doc, [cands[k] for k in order]))
        # Round-robin over documents so no single long document dominates.
        picked: list[dict] = []
        depth = 0
        while len(picked) < wanted and any(depth < len(p) for _, p in pools):
            for doc, pool in pools:
                if depth < len(pool) and len(picked) < wanted:
                    line, text = pool[depth]
                    picked.append(
                        {
                            "id": f"{doc.domain}/{doc.name}#L{line}",
                            "prompt": text,
                            "split": prompt_split,
                            "doc": doc.name,
                        }
                    )
            depth += 1
        if len(picked) < wanted:
            raise RuntimeError(
                f"Only {len(picked)} {prompt_split} prompts available, {wanted} requested"
            )
        records.extend(picked)
    return records


def write_prompts(records: list[dict], path: Path) -> None:
    """Write prompt records as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
