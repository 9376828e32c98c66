"""Byte-level BPE tokenizer shared by the target and the draft."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, UNK, PAD)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"
)
"""Base (completion) models: a conversation renders as BOS plus the plain text of
its messages, and a generation prompt adds nothing."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE tokenizer.

    Args:
        texts (Iterable[str]): Training texts, one document each.
        vocab_size (int): Target vocabulary size, special tokens included.
            Default: ``4096``.

    Returns:
        tokenizers.Tokenizer: A tokenizer whose encoding prepends ``<s>`` and whose
        decoding round-trips any text byte for byte.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, bos_id)],
    )
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path, *, max_length: int) -> None:
    """Write the tokenizer in the Hugging Face layout ``AutoTokenizer`` and mlx-lm read.

    Args:
        tok (tokenizers.Tokenizer): The trained tokenizer.
        out_dir (Path): Destination directory (created if needed).
        max_length (int): The models' context length, recorded as
            ``model_max_length``.
    """
    from transformers import PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    # Newer transformers may keep the template in a separate file; keep it in
    # tokenizer_config.json too so older readers find it.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    # The class name transformers 4.x and 5.x both resolve (5.x aliases it).
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["add_bos_token"] = True
    config["add_eos_token"] = False
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special_map = out_dir / "special_tokens_map.json"
    if not special_map.exists():
        special_map.write_text(
            json.dumps(
                {
                    "bos_token": BOS,
                    "eos_token": EOS,
                    "unk_token": UNK,
                    "pad_token": PAD,
                },
                indent=2,
            )
            + "\n"
        )
    template_file = out_dir / "chat_template.jinja"
    if template_file.exists():
        template_file.unlink()
