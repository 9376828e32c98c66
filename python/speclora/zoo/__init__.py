"""The shipped target/draft model pair and its held-out prompts.

A small Llama-architecture pair trained offline by ``python -m speclora.zoo build``:
the target knows Python code and the Python documentation; the draft, a quarter of
its width and one layer deep, learnt to imitate the target on the documentation
only, so it is clearly weaker on code. Refer to them as
``"zoo:target"`` and ``"zoo:draft"`` wherever a model path or hub id is accepted.
"""

from __future__ import annotations

import json
from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent
"""Directory holding ``target/``, ``draft/``, ``prompts/`` and ``manifest.json``."""

MODEL_NAMES = ("target", "draft")
PROMPT_DOMAINS = ("prose", "code")
PROMPT_SPLITS = ("train", "eval")
REF_PREFIX = "zoo:"


def model_path(name: str) -> Path:
    """Directory of a shipped model, loadable with ``mlx_lm.load``.

    Args:
        name (str): ``"target"`` or ``"draft"``.

    Returns:
        Path: The model directory.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"Unknown zoo model {name!r}; expected one of {MODEL_NAMES}")
    return ZOO_DIR / name


def resolve(ref: str) -> str:
    """Map ``"zoo:target"`` / ``"zoo:draft"`` to a directory; return other refs unchanged.

    Args:
        ref (str): A model reference: a ``zoo:`` name, a local path or a hub id.

    Returns:
        str: A path or hub id ``mlx_lm.load`` accepts.
    """
    if ref.startswith(REF_PREFIX):
        return str(model_path(ref[len(REF_PREFIX) :]))
    return ref


def load_prompts(domain: str, split: str) -> list[str]:
    """Held-out prompts for one domain, in file order.

    Args:
        domain (str): ``"prose"`` or ``"code"``.
        split (str): ``"train"`` (for adapting a draft) or ``"eval"`` (for measuring).

    Returns:
        list[str]: Prompt texts (without BOS; tokenizers add it).
    """
    if domain not in PROMPT_DOMAINS:
        raise ValueError(
            f"Unknown prompt domain {domain!r}; expected one of {PROMPT_DOMAINS}"
        )
    if split not in PROMPT_SPLITS:
        raise ValueError(
            f"Unknown prompt split {split!r}; expected one of {PROMPT_SPLITS}"
        )
    path = ZOO_DIR / "prompts" / f"{domain}.jsonl"
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r["prompt"] for r in records if r["split"] == split]
