"""Tiny models, tokenizers and LoRA adapters built in code for the tests.

Everything here is seeded and offline. Directories written by these functions
load with ``mlx_lm.load`` like any model from the hub.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

# isort: split
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load_model, save_config, save_model

from speclora.records import TrainingExample

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, UNK, PAD)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"
)

TINY_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256
"""Size of the test tokenizer: the special tokens plus one token per byte."""


@dataclass(frozen=True)
class TinyModelDirs:
    """A target and a draft model directory that share a tokenizer."""

    target: Path
    draft: Path


def make_tiny_llama(
    hidden_size: int = 32,
    num_layers: int = 2,
    vocab_size: int = TINY_VOCAB_SIZE,
    seed: int = 0,
    *,
    tie_word_embeddings: bool = True,
) -> llama.Model:
    """Build a randomly initialized Llama model.

    Args:
        hidden_size (int): Model width; a multiple of 16 (16-wide heads).
            Default: ``32``.
        num_layers (int): Number of transformer blocks. Default: ``2``.
        vocab_size (int): Embedding rows. Default: ``TINY_VOCAB_SIZE``.
        seed (int): Seed for the weights. Default: ``0``.
        tie_word_embeddings (bool): Share the embedding with the output
            projection. Default: ``True``.

    Returns:
        llama.Model: The model, in eval mode, float32, parameters evaluated.
        Its ``args`` hold everything ``save_model_dir`` writes to config.json.
    """
    if hidden_size % 16:
        raise ValueError(f"hidden_size must be a multiple of 16, got {hidden_size}")
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        intermediate_size=2 * hidden_size,
        num_attention_heads=hidden_size // 16,
        num_key_value_heads=max(1, hidden_size // 32),
        rms_norm_eps=1e-5,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
    )
    mx.random.seed(seed)
    model = llama.Model(args)
    mx.eval(model.parameters())
    model.eval()
    return model


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte-to-printable-character map used by byte-level BPE."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


def save_tokenizer(out_dir: Path) -> None:
    """Write a byte-level BPE tokenizer with no merges (one token per byte).

    Token ids: ``<s>``=0, ``</s>``=1, ``<unk>``=2, ``<pad>``=3, and byte ``b``
    is token ``4 + b``. Encoding prepends ``<s>``; the chat template is BOS plus the
    messages' text.

    Args:
        out_dir (Path): Destination directory (created if needed).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for byte, symbol in _byte_symbols().items():
        vocab[symbol] = len(SPECIAL_TOKENS) + byte
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 0)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))


def save_model_dir(
    model: llama.Model, out_dir: Path, *, tokenizer: bool = True
) -> Path:
    """Save a model built by ``make_tiny_llama`` as an mlx-lm model directory.

    Args:
        model (llama.Model): The model.
        out_dir (Path): Destination directory (created if needed).
        tokenizer (bool): Also write the test tokenizer. Default: ``True``.

    Returns:
        Path: ``out_dir``.
    """
    save_model(out_dir, model)
    config = {k: v for k, v in vars(model.args).items() if v is not None}
    config["bos_token_id"] = 0
    config["eos_token_id"] = 1
    save_config(config, out_dir / "config.json")
    if tokenizer:
        save_tokenizer(out_dir)
    return out_dir


def make_tiny_pair(root: Path) -> TinyModelDirs:
    """Write a 64-wide 2-block target and a 32-wide 1-block draft under ``root``.

    Both use the test tokenizer and ``TINY_VOCAB_SIZE``; weights are seeded.

    Args:
        root (Path): Parent directory; ``target/`` and ``draft/`` are created.

    Returns:
        TinyModelDirs: The two directories.
    """
    target = save_model_dir(make_tiny_llama(64, 2, seed=1), root / "target")
    draft = save_model_dir(make_tiny_llama(32, 1, seed=2), root / "draft")
    return TinyModelDirs(target=target, draft=draft)


def make_lora_adapter(
    model_dir: Path,
    out_dir: Path,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    num_layers: int = -1,
    keys: tuple[str, ...] = ("self_attn.q_proj", "self_attn.v_proj"),
    seed: int = 0,
) -> Path:
    """Write a random (non-zero) LoRA adapter for a model directory in mlx-lm's format.

    The adapter is made with mlx-lm's own tooling (``linear_to_lora_layers``)
    so that ``mlx_lm.load(model_dir, adapter_path=out_dir)`` reads it.

    Args:
        model_dir (Path): The model the adapter is for.
        out_dir (Path): Destination directory (created if needed).
        rank (int): LoRA rank. Default: ``4``.
        alpha (float): LoRA alpha; mlx-lm's ``scale`` is ``alpha / rank``.
            Default: ``8.0``.
        num_layers (int): Blocks adapted, counted from the last; -1 = all.
            Default: ``-1``.
        keys (tuple[str, ...]): Module paths inside a block. Default: the
            attention query and value projections.
        seed (int): Seed for the adapter weights. Default: ``0``.

    Returns:
        Path: ``out_dir``, holding ``adapters.safetensors`` and ``adapter_config.json``.
    """
    model, _ = load_model(Path(model_dir))
    model.freeze()
    lora_parameters = {
        "rank": rank,
        "scale": alpha / rank,
        "dropout": 0.0,
        "keys": list(keys),
    }
    mx.random.seed(seed)
    linear_to_lora_layers(model, num_layers, lora_parameters)
    # mlx-lm starts lora_b at zero (a no-op adapter); randomize it so the
    # adapter changes the logits.
    weights = {}
    trainable = cast(
        list[tuple[str, mx.array]], tree_flatten(model.trainable_parameters())
    )
    for name, value in trainable:
        if name.endswith("lora_b"):
            value = mx.random.normal(value.shape) / math.sqrt(value.shape[0])
        weights[name] = value
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "adapters.safetensors"), weights)
    config = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {**lora_parameters, "alpha": alpha},
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def tiny_system_config(models: TinyModelDirs, root: Path, **training: object) -> dict[str, object]:
    """A system config for the tiny pair whose detailed generations are all collected.

    Args:
        models (TinyModelDirs): The pair (e.g. the ``tiny_model_dir`` fixture).
        root (Path): Where the data and checkpoint directories go.
        training: Overrides of the ``training`` section.
    """
    return {
        "models": {"target": str(models.target), "draft": str(models.draft)},
        "generation": {"max_tokens": 8, "num_draft_tokens": 3, "adaptive_draft": False},
        "collection": {"data_dir": str(root / "data"), "acceptance_threshold": 1.0},
        "training": {
            "checkpoint_dir": str(root / "checkpoints"),
            "min_examples": 2,
            "num_epochs": 1,
            "batch_size": 2,
            "rank": 4,
            "alpha": 8,
            "eval_fraction": 0.0,
            **training,
        },
        "logging": {"show_progress": False},
    }


def synthetic_example(example_id: str, seed: int = 0) -> TrainingExample:
    """A valid training example with random prompt and output tokens of the tiny vocabulary."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return TrainingExample(
        id=example_id,
        prompt="p",
        target_output="t",
        acceptance_rate=0.1,
        prompt_tokens=rng.integers(4, TINY_VOCAB_SIZE, 6).tolist(),
        output_tokens=rng.integers(4, TINY_VOCAB_SIZE, 12).tolist(),
        disagreements=[],
        timestamp="2024-01-01T00:00:00",
    )
