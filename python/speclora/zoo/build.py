"""Build the shipped target/draft pair from offline text, reproducibly.

Run ``python -m speclora.zoo build`` to regenerate the committed weights (about
an hour on two CPU cores, most of it the target) or ``--quick`` for a tiny
end-to-end run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from speclora.zoo.corpus import (
    DOMAINS,
    Document,
    code_root,
    corpus_digest,
    load_corpus,
    prose_source,
)
from speclora.zoo.prompts import make_prompts, write_prompts
from speclora.zoo.tokenizer import (
    BOS,
    EOS,
    TOKENIZER_FILES,
    save_tokenizer,
    train_tokenizer,
)
from speclora.zoo.train import (
    ModelSpec,
    TrainSpec,
    WindowSampler,
    build_model,
    mean_loss,
    train,
)

if TYPE_CHECKING:
    from mlx import nn
    from tokenizers import Tokenizer

MODEL_NAMES = ("target", "draft")


@dataclass
class BuildConfig:
    """Everything that determines the built pair."""

    vocab_size: int = field(metadata={"help": "BPE vocabulary size."})
    seq_len: int = field(metadata={"help": "Training context, BOS included."})
    context_len: int = field(
        metadata={
            "help": "Declared context (max_position_embeddings): rotary positions carry "
            "past seq_len; benchmarks/long_context.py measures how far."
        }
    )
    models: dict[str, ModelSpec] = field(metadata={"help": "Name -> architecture."})
    training: dict[str, TrainSpec] = field(metadata={"help": "Name -> optimisation."})
    prompts_per_split: dict[str, int] = field(metadata={"help": "Prompts per domain."})
    eval_windows: int = field(metadata={"help": "Loss windows per domain and split."})
    max_docs: int | None = field(
        default=None, metadata={"help": "Docs per split (quick)."}
    )


def full_config() -> BuildConfig:
    """The configuration of the committed pair."""
    seq_len = 256
    return BuildConfig(
        vocab_size=4096,
        seq_len=seq_len,
        # Held-out loss at positions 256-2048 is no higher than at 0-256 for either
        # model (benchmarks/results/long_context_{1024,2048}.md).
        context_len=2048,
        models={
            "target": ModelSpec(256, 6, 768, 4, 4),
            "draft": ModelSpec(64, 1, 192, 2, 2),
        },
        training={
            # The target sees both domains equally. The draft learns to imitate the
            # target's next-token distributions, on prose only (it meets Python just
            # in the docs' examples): imitation buys acceptance for its size, and it
            # stays clearly weaker on code, the shift online learning should repair.
            "target": TrainSpec(
                steps=600,
                batch_size=16,
                seq_len=seq_len,
                learning_rate=1.5e-3,
                warmup_steps=30,
                weight_decay=0.01,
                mix={"prose": 0.5, "code": 0.5},
                seed=1,
            ),
            "draft": TrainSpec(
                steps=240,
                batch_size=16,
                seq_len=seq_len,
                learning_rate=3e-3,
                warmup_steps=30,
                weight_decay=0.01,
                mix={"prose": 1.0, "code": 0.0},
                seed=2,
                teacher="target",
            ),
        },
        prompts_per_split={"eval": 96, "train": 320},
        eval_windows=128,
    )


def quick_config() -> BuildConfig:
    """A tiny configuration that exercises every stage in well under a minute."""
    seq_len = 64

    def tiny(mix: dict[str, float], seed: int, teacher: str | None = None) -> TrainSpec:
        return TrainSpec(
            steps=8,
            batch_size=4,
            seq_len=seq_len,
            learning_rate=3e-3,
            warmup_steps=2,
            weight_decay=0.01,
            mix=mix,
            seed=seed,
            teacher=teacher,
        )

    return BuildConfig(
        vocab_size=512,
        seq_len=seq_len,
        context_len=seq_len,
        models={
            "target": ModelSpec(32, 1, 64, 2, 2),
            "draft": ModelSpec(16, 1, 32, 1, 1),
        },
        training={
            "target": tiny({"prose": 0.5, "code": 0.5}, seed=1),
            "draft": tiny({"prose": 1.0, "code": 0.0}, seed=2, teacher="target"),
        },
        prompts_per_split={"eval": 4, "train": 8},
        eval_windows=4,
        max_docs=12,
    )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("mlx", "mlx-lm", "tokenizers", "transformers", "numpy", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _subset(docs: list[Document], max_docs: int | None) -> list[Document]:
    if max_docs is None:
        return docs
    out: list[Document] = []
    for split in ("train", "prompt-train", "eval"):
        out.extend([d for d in docs if d.split == split][:max_docs])
    return out


def _stream(docs: list[Document], encode, eos_id: int) -> np.ndarray:
    """Token ids of the documents, each followed by EOS."""
    parts = []
    for doc in docs:
        parts.append(np.asarray(encode(doc.text), dtype=np.int32))
        parts.append(np.asarray([eos_id], dtype=np.int32))
    return np.concatenate(parts)


def _special_id(tok: Tokenizer, token: str) -> int:
    token_id = tok.token_to_id(token)
    if token_id is None:
        raise RuntimeError(f"Tokenizer lacks the special token {token!r}")
    return token_id


def _prefixed(log: Callable[[str], None], name: str) -> Callable[[str], None]:
    return lambda msg: log(f"[{name}] {msg}")


def _num_parameters(model: nn.Module) -> int:
    from mlx.utils import tree_flatten

    flat = cast(list[tuple[str, Any]], tree_flatten(model.parameters()))
    return sum(v.size for _, v in flat)


def _kept_models(out: Path, tok_dir: Path, *, keep: set[str]) -> dict:
    """Manifest entries of models kept from a previous build in ``out``.

    The kept models get this build's tokenizer files (same vocabulary, checked;
    the metadata beside it may be newer), so they match a full build's.
    """
    import shutil

    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        raise RuntimeError(f"No previous build to keep models from: {manifest_path}")
    previous = json.loads(manifest_path.read_text())
    fresh = (tok_dir / "tokenizer.json").read_bytes()
    for name in keep:
        kept = out / name / "tokenizer.json"
        if not kept.exists() or kept.read_bytes() != fresh:
            raise RuntimeError(f"Tokenizer of the kept model {kept.parent} differs")
        for file in TOKENIZER_FILES:
            shutil.copy(tok_dir / file, out / name / file)
    kept_models = {name: previous["models"][name] for name in keep}
    for entry in kept_models.values():
        # Manifests from before distillation existed: no teacher is what they meant.
        entry["training"].setdefault("teacher", None)
    return kept_models


def _training_order(cfg: BuildConfig) -> list[str]:
    """Model names with every teacher before the models it teaches."""
    for name in MODEL_NAMES:
        teacher = cfg.training[name].teacher
        if teacher is not None and (teacher == name or teacher not in MODEL_NAMES):
            raise ValueError(
                f"{name!r} cannot learn from teacher {teacher!r}; expected one of "
                f"{[n for n in MODEL_NAMES if n != name]}"
            )
    if all(cfg.training[n].teacher is not None for n in MODEL_NAMES):
        raise ValueError(f"Models {MODEL_NAMES} cannot all learn from one another")
    return sorted(MODEL_NAMES, key=lambda n: cfg.training[n].teacher is not None)


def _load_teacher(path: Path) -> nn.Module:
    """A saved model as a frozen teacher.

    The student always learns from the saved fp16 weights, so retraining it alone
    (``--only``) gives the same files as a full build. They are widened to fp32,
    exactly, because fp16 matmuls are slow on CPUs.
    """
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    model.set_dtype(mx.float32)
    model.freeze()
    return model


def _save_model(model, config: dict, tok_dir: Path, out: Path) -> None:
    import shutil

    import mlx.core as mx
    from mlx_lm.utils import save_config, save_model

    model.set_dtype(mx.float16)
    save_model(out, model)
    save_config(dict(config), config_path=out / "config.json")
    for name in TOKENIZER_FILES:
        shutil.copy(tok_dir / name, out / name)


def build(
    cfg: BuildConfig,
    out: Path,
    *,
    only: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Build corpora splits, tokenizer, prompts and both models into ``out``.

    Args:
        cfg (BuildConfig): What to build.
        out (Path): Destination; gets ``target/``, ``draft/``, ``prompts/`` and
            ``manifest.json``.
        only (str, optional): Train just this model and keep the other one
            already in ``out`` (its tokenizer must be byte-identical to the one
            rebuilt here). Each model's training depends only on its own seed,
            so this gives the same files as a full build. Default: ``None``.
        log (Callable[[str], None]): Progress sink. Default: ``print``.

    Returns:
        dict: The manifest that was written.
    """
    if only is not None and only not in MODEL_NAMES:
        raise ValueError(f"Unknown model {only!r}; expected one of {MODEL_NAMES}")
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    docs = {d: _subset(load_corpus(d), cfg.max_docs) for d in DOMAINS}
    corpora = {}
    for d in DOMAINS:
        corpora[d] = {
            "files": len(docs[d]),
            "bytes": sum(len(x.text.encode("utf-8")) for x in docs[d]),
            "sha256": corpus_digest(docs[d]),
            "split_files": {
                s: sum(1 for x in docs[d] if x.split == s)
                for s in ("train", "prompt-train", "eval")
            },
        }
    corpora["code"]["source"] = str(code_root())
    corpora["prose"]["source"] = prose_source()
    log(f"corpora: {json.dumps(corpora)}")

    train_docs = [x for d in DOMAINS for x in docs[d] if x.split == "train"]
    tok = train_tokenizer((x.text for x in train_docs), vocab_size=cfg.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        save_tokenizer(tok, tok_dir, max_length=cfg.context_len)
        bos_id, eos_id = _special_id(tok, BOS), _special_id(tok, EOS)

        def encode(text: str) -> list[int]:
            return tok.encode(text, add_special_tokens=False).ids

        train_streams, heldout_streams = {}, {}
        for d in DOMAINS:
            train_streams[d] = _stream(
                [x for x in docs[d] if x.split == "train"], encode, eos_id
            )
            heldout_streams[d] = _stream(
                [x for x in docs[d] if x.split != "train"], encode, eos_id
            )
            corpora[d]["split_tokens"] = {
                "train": len(train_streams[d]),
                "heldout": len(heldout_streams[d]),
            }
        log(f"tokens: { {d: corpora[d]['split_tokens'] for d in DOMAINS} }")

        prompt_counts = {}
        for d in DOMAINS:
            records = make_prompts(
                docs[d], lambda s: len(encode(s)), per_split=cfg.prompts_per_split
            )
            write_prompts(records, out / "prompts" / f"{d}.jsonl")
            prompt_counts[d] = {
                s: sum(1 for r in records if r["split"] == s) for s in ("train", "eval")
            }

        train_sampler = WindowSampler(train_streams, bos_id=bos_id, seq_len=cfg.seq_len)
        heldout_sampler = WindowSampler(
            heldout_streams, bos_id=bos_id, seq_len=cfg.seq_len
        )
        loss_windows = {
            (split, d): sampler.fixed_windows(d, cfg.eval_windows)
            for split, sampler in (
                ("train", train_sampler),
                ("heldout", heldout_sampler),
            )
            for d in DOMAINS
        }
        results = {}
        if only is not None:
            results.update(_kept_models(out, tok_dir, keep=set(MODEL_NAMES) - {only}))
        for name in _training_order(cfg):
            if name in results:
                continue
            spec, tspec = cfg.models[name], cfg.training[name]
            config = spec.config(
                vocab_size=tok.get_vocab_size(),
                max_len=cfg.context_len,
                bos_id=bos_id,
                eos_id=eos_id,
            )
            model = build_model(spec, config, tspec.seed)
            log(f"training {name}: {asdict(spec)}")
            teacher = None
            if tspec.teacher is not None:
                teacher = _load_teacher(out / tspec.teacher)
            stats = train(
                model,
                train_sampler,
                tspec,
                teacher=teacher,
                log=_prefixed(log, name),
            )
            losses = {
                f"{split}_{d}": round(mean_loss(model, w), 4)
                for (split, d), w in loss_windows.items()
            }
            log(f"{name} losses: {losses}")
            _save_model(model, config, tok_dir, out / name)
            results[name] = {
                "architecture": asdict(spec),
                "training": asdict(tspec),
                "parameters": _num_parameters(model),
                "train_seconds": round(stats["seconds"], 1),
                "final_train_batch_loss": round(stats["final_train_loss"], 4),
                "losses": losses,
            }

    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if (
            path.is_file()
            and rel != "manifest.json"
            and (rel.split("/")[0] in MODEL_NAMES or rel.startswith("prompts/"))
        ):
            files[rel] = _sha256_file(path)
    manifest = {
        "format": 1,
        "corpora": corpora,
        "split_rule": (
            "sha256(domain/relative_path): first 4 bytes little-endian mod 1000 < 150 "
            "is held out; held-out docs with byte 4 even are eval, odd prompt-train"
        ),
        "tokenizer": {"type": "byte-level BPE", "vocab_size": tok.get_vocab_size()},
        "seq_len": cfg.seq_len,
        "context_len": cfg.context_len,
        "eval_windows_per_domain": cfg.eval_windows,
        "prompts": prompt_counts,
        "models": results,
        "build_seconds": round(time.perf_counter() - t_start, 1),
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
        "versions": _versions(),
        "files": files,
    }
    with open(out / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point.

    ``python -m speclora.zoo build [--out DIR] [--quick] [--only {target,draft}]``.
    """
    from speclora.zoo import ZOO_DIR

    parser = argparse.ArgumentParser(prog="python -m speclora.zoo")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="Train the shipped target/draft pair.")
    b.add_argument(
        "--out", type=Path, default=None, help=f"Output dir (default {ZOO_DIR})."
    )
    b.add_argument(
        "--quick", action="store_true", help="Tiny pair in a temp dir, for smoke tests."
    )
    b.add_argument(
        "--only",
        choices=MODEL_NAMES,
        default=None,
        help="Retrain one model, keeping the other already in --out.",
    )
    args = parser.parse_args(argv)
    cfg = quick_config() if args.quick else full_config()
    if args.out is not None:
        out = args.out
    elif args.quick:
        out = Path(tempfile.mkdtemp(prefix="speclora-zoo-"))
    else:
        out = ZOO_DIR

    def log(msg: str) -> None:
        print(msg, flush=True)

    manifest = build(cfg, out, only=args.only, log=log)
    log(f"wrote {out} in {manifest['build_seconds']}s")


if __name__ == "__main__":
    main()
