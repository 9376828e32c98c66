"""Loading the target/draft pair and checking that a request fits.

Models load through mlx-lm (a local directory, a hub id, or ``zoo:NAME`` for a
model shipped with the package) and are checked as a pair (vocabulary,
tokenizer). Adapters are :mod:`speclora.adapters`; ``ModelManager`` keeps the
API reference's adapter methods as thin faces over it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx_lm.tokenizer_utils import TokenizerWrapper

from speclora import adapters
from speclora.adapters import flat_parameters, read_json_object
from speclora.config import ZOO_PREFIX, Config

# Files that define a Hugging Face tokenizer; a model directory without any of
# them uses the target's tokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _is_hub_id(ref: str) -> bool:
    return _HUB_ID.fullmatch(ref) is not None and not ref.startswith(".")


def _vocab_size(config: Mapping[str, Any]) -> int | None:
    for section in (config, config.get("text_config") or {}):
        size = section.get("vocab_size")
        if isinstance(size, int):
            return size
    return None


def _set_compute_dtype(model: nn.Module, dtype: str) -> None:
    """Cast the model's floating-point parameters to the configured type.

    ``auto`` upcasts half precision to float32 on the CPU: MLX's CPU matmul has no
    half-precision BLAS path (a 6M-parameter model decodes about 4x slower in float16
    there), and float32 also makes batched verification agree with one-token decoding
    far more often at near-ties.
    """
    if dtype == "auto":
        if mx.default_device() != mx.cpu:
            return
        dtype = "float32"
    target = getattr(mx, dtype)
    floats = {p.dtype for _, p in flat_parameters(model) if mx.issubdtype(p.dtype, mx.floating)}
    if floats and floats != {target}:
        model.set_dtype(target)
        mx.eval(model.parameters())


def _quantize(model: nn.Module, config: dict[str, Any], bits: int | None, group_size: int) -> None:
    """Quantize ``model``'s weights with mlx-lm, unless it is quantized already."""
    if bits is None or "quantization" in config:
        return
    from mlx_lm.utils import quantize_model

    quantize_model(model, config, group_size, bits)
    mx.eval(model.parameters())


def context_window(model: nn.Module) -> int | None:
    """The model's declared context (``max_position_embeddings``), if it has one."""
    window = getattr(getattr(model, "args", None), "max_position_embeddings", None)
    return window if isinstance(window, int) and not isinstance(window, bool) else None


def check_context(window: int | None, prompt_tokens: int, max_tokens: int) -> None:
    """The context check every generation entry point makes, with one error.

    Raises:
        MemoryError: ``prompt_tokens + max_tokens`` exceeds ``window``.
    """
    total = prompt_tokens + max_tokens
    if window is not None and total > window:
        raise MemoryError(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} exceeds "
            f"the target's context window of {window} tokens; shorten the prompt or lower max_tokens"
        )


def _kv_bytes_per_token(config: Mapping[str, Any], model: nn.Module) -> int:
    """Bytes a KV cache holds per token for a model (keys and values)."""
    layers = int(config.get("num_hidden_layers", 0))
    heads = int(config.get("num_attention_heads", 1))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config.get("hidden_size", 0) // max(heads, 1))
    itemsize = max((p.dtype.size for _, p in flat_parameters(model) if mx.issubdtype(p.dtype, mx.floating)), default=4)
    return 2 * layers * kv_heads * head_dim * itemsize


class ModelManager:
    """Loads the target and draft models and manages LoRA adapters on them.

    Args:
        config (Mapping[str, Any] | Config): The full configuration (as parsed
            from ``configs/config.yaml`` or returned by ``load_config``);
            validated here. Relative paths resolve against the current directory.

    Example:
        >>> manager = ModelManager(config)
        >>> target_model, draft_model = manager.load_models()
        >>> manager.load_lora_adapter(draft_model, "checkpoints/best", fuse=True)
    """

    def __init__(self, config: Mapping[str, Any] | Config):
        self.config = config if isinstance(config, Config) else Config.from_dict(config)
        self._target: nn.Module | None = None
        self._draft: nn.Module | None = None
        self._tokenizer: TokenizerWrapper | None = None
        self.target_config: dict[str, Any] = {}
        self.draft_config: dict[str, Any] = {}
        self._longest_token: int | None = None

    @property
    def target_model(self) -> nn.Module:
        """The target (verifier) model. Raises RuntimeError before ``load_models``."""
        if self._target is None:
            raise RuntimeError("models are not loaded: call load_models() first")
        return self._target

    @property
    def draft_model(self) -> nn.Module:
        """The draft (proposer) model. Raises RuntimeError before ``load_models``."""
        if self._draft is None:
            raise RuntimeError("models are not loaded: call load_models() first")
        return self._draft

    @property
    def tokenizer(self) -> TokenizerWrapper:
        """The tokenizer shared by both models (the target's)."""
        if self._tokenizer is None:
            raise RuntimeError("models are not loaded: call load_models() first")
        return self._tokenizer

    @property
    def is_loaded(self) -> bool:
        """Whether ``load_models`` has completed."""
        return self._tokenizer is not None

    # ------------------------------------------------------------------ models

    def load_models(self) -> tuple[nn.Module, nn.Module]:
        """Load the target, the draft and the target's tokenizer.

        The pair is checked before it is returned: both models must have the
        same vocabulary size, and a draft that ships its own tokenizer must
        agree with the target's on the vocabulary and the special tokens.

        Returns:
            tuple[nn.Module, nn.Module]: ``(target_model, draft_model)``, in
            eval mode.

        Raises:
            RuntimeError: A model cannot be found or loaded.
            ValueError: The two models cannot speculate together.
        """
        from mlx_lm.utils import load_tokenizer

        target_ref, draft_ref = self.config.models.target, self.config.models.draft
        target_loc = self._locate(target_ref)
        draft_loc = self._locate(draft_ref)
        target, target_config = self._load_model(target_ref, target_loc)
        try:
            tokenizer = load_tokenizer(
                target_loc, eos_token_ids=target_config.get("eos_token_id")
            )
        except Exception as e:
            raise RuntimeError(
                f"cannot load the tokenizer of model {target_ref!r} from {target_loc}: {e}"
            ) from e
        draft, draft_config = self._load_model(draft_ref, draft_loc)

        self._check_vocab_sizes(
            target_ref, target, target_config, draft_ref, draft, draft_config
        )
        for model, config in ((target, target_config), (draft, draft_config)):
            _set_compute_dtype(model, self.config.models.dtype)
            _quantize(model, config, self.config.models.quantize_bits, self.config.models.quantize_group_size)
        if not self._same_tokenizer_files(target_loc, draft_loc):
            try:
                draft_tokenizer = load_tokenizer(
                    draft_loc, eos_token_ids=draft_config.get("eos_token_id")
                )
            except Exception as e:
                raise RuntimeError(
                    f"cannot load the tokenizer of model {draft_ref!r} from {draft_loc}: {e}"
                ) from e
            self._check_tokenizers(target_ref, tokenizer, draft_ref, draft_tokenizer)

        self._target, self._draft, self._tokenizer = target, draft, tokenizer
        self.target_config, self.draft_config = target_config, draft_config
        return target, draft

    @staticmethod
    def _locate(ref: str) -> Path:
        """Turn a model reference into a local directory (downloading hub ids)."""
        if ref.startswith(ZOO_PREFIX):
            try:
                from speclora import zoo

                path = Path(zoo.resolve(ref))
            except Exception as e:
                raise RuntimeError(f"cannot load model {ref!r}: {e}") from e
        else:
            path = Path(ref).expanduser()
            if not path.exists():
                if not _is_hub_id(ref):
                    raise RuntimeError(
                        f"cannot load model {ref!r}: directory {path} does not exist"
                    )
                try:
                    from huggingface_hub import snapshot_download
                    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

                    path = Path(
                        snapshot_download(ref, allow_patterns=DEFAULT_ALLOW_PATTERNS)
                    )
                except Exception as e:
                    raise RuntimeError(
                        f"cannot load model {ref!r}: no such local directory, and the hub "
                        f"download failed ({type(e).__name__}: {e})"
                    ) from e
        if not path.is_dir():
            raise RuntimeError(f"cannot load model {ref!r}: {path} is not a directory")
        return path

    @staticmethod
    def _load_model(ref: str, path: Path) -> tuple[nn.Module, dict[str, Any]]:
        from mlx_lm.utils import load_model

        config = read_json_object(path / "config.json", f"model {ref!r} at", path)
        if not isinstance(config.get("model_type"), str):
            raise RuntimeError(
                f"cannot load model {ref!r}: {path / 'config.json'} has no model_type"
            )
        try:
            model, config = load_model(path)
        except Exception as e:
            raise RuntimeError(
                f"cannot load model {ref!r} from {path}: {type(e).__name__}: {e}"
            ) from e
        model.eval()
        return model, config

    @staticmethod
    def _check_vocab_sizes(
        target_ref: str,
        target: nn.Module,
        target_config: Mapping[str, Any],
        draft_ref: str,
        draft: nn.Module,
        draft_config: Mapping[str, Any],
    ) -> None:
        t_size, d_size = _vocab_size(target_config), _vocab_size(draft_config)
        if t_size is not None and d_size is not None and t_size != d_size:
            raise ValueError(
                f"target {target_ref!r} and draft {draft_ref!r} cannot speculate together: "
                f"vocab_size {t_size} != {d_size}"
            )
        # The logits' width is what the verifier compares; configs may omit it.
        probe = mx.array([[0]])
        t_width, d_width = target(probe).shape[-1], draft(probe).shape[-1]
        if t_width != d_width:
            raise ValueError(
                f"target {target_ref!r} and draft {draft_ref!r} cannot speculate together: "
                f"they output {t_width} and {d_width} logits per token"
            )

    @staticmethod
    def _same_tokenizer_files(target_dir: Path, draft_dir: Path) -> bool:
        """True if the draft has no tokenizer files or the same ones as the target."""
        draft_files = [
            name for name in _TOKENIZER_FILES if (draft_dir / name).is_file()
        ]
        for name in draft_files:
            other = target_dir / name
            if (
                not other.is_file()
                or other.read_bytes() != (draft_dir / name).read_bytes()
            ):
                return False
        return True

    @staticmethod
    def _check_tokenizers(
        target_ref: str,
        target_tok: TokenizerWrapper,
        draft_ref: str,
        draft_tok: TokenizerWrapper,
    ) -> None:
        prefix = (
            f"target {target_ref!r} and draft {draft_ref!r} cannot speculate together"
        )
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            t_id, d_id = getattr(target_tok, attr, None), getattr(draft_tok, attr, None)
            if t_id != d_id:
                raise ValueError(
                    f"{prefix}: their tokenizers disagree on {attr} ({t_id} != {d_id})"
                )
        t_vocab, d_vocab = target_tok.get_vocab(), draft_tok.get_vocab()
        if t_vocab != d_vocab:
            differing = sorted(
                set(t_vocab.items()) ^ set(d_vocab.items()), key=lambda kv: kv[1]
            )
            example = ", ".join(f"{tok!r}->{i}" for tok, i in differing[:3])
            raise ValueError(
                f"{prefix}: their tokenizers' vocabularies differ "
                f"({len(t_vocab)} vs {len(d_vocab)} tokens; e.g. {example})"
            )

    def training_copy_of_draft(self) -> nn.Module:
        """A fresh copy of the draft with its base weights, for training.

        Training a copy leaves the draft that serves requests untouched (whatever
        adapter it has fused) until the new adapter is swapped in.

        Returns:
            nn.Module: The draft reloaded from its source, in eval mode.
        """
        if not self.is_loaded:
            raise RuntimeError("ModelManager.load_models() must be called first")
        ref = self.config.models.draft
        model, _ = self._load_model(ref, self._locate(ref))
        _set_compute_dtype(model, self.config.models.dtype)
        return model

    def check_prompt_length(self, prompt: str) -> None:
        """Refuse a prompt too long for the context window before tokenizing it.

        No token covers more characters than the longest vocabulary entry, so a
        prompt needs at least ``len(prompt) / longest`` tokens; past the window that
        is certain without spending seconds and gigabytes encoding it.

        Raises:
            MemoryError: the prompt cannot fit the target's context window.
        """
        window = self.target_config.get("max_position_embeddings")
        if not isinstance(window, int):
            return
        if self._longest_token is None:
            self._longest_token = max((len(t) for t in self.tokenizer.get_vocab()), default=1)
        fewest = len(prompt) // max(self._longest_token, 1)
        if fewest > window:
            raise MemoryError(
                f"prompt of {len(prompt)} characters encodes to at least {fewest} tokens, beyond "
                f"the target's context window of {window} tokens"
            )

    def check_fits(self, prompt_tokens: int, max_tokens: int, memory_limit_gb: float | None = None) -> None:
        """Refuse a request that cannot fit, before any memory is spent on it.

        Args:
            prompt_tokens (int): Length of the encoded prompt.
            max_tokens (int): Tokens to generate.
            memory_limit_gb (float, optional): Budget for the two models' KV caches.

        Raises:
            MemoryError: the request exceeds the target's context window
                (``max_position_embeddings``) or the KV caches would exceed the budget.
        """
        total = prompt_tokens + max_tokens
        window = self.target_config.get("max_position_embeddings")
        check_context(window if isinstance(window, int) else None, prompt_tokens, max_tokens)
        if memory_limit_gb is not None:
            need = total * sum(
                _kv_bytes_per_token(c, m)
                for c, m in ((self.target_config, self.target_model), (self.draft_config, self.draft_model))
            )
            if need > memory_limit_gb * 2**30:
                raise MemoryError(
                    f"the KV caches for {total} tokens need {need / 2**30:.2f} GiB, over "
                    f"generation.memory_limit_gb = {memory_limit_gb}; lower max_tokens"
                )

    # ------------------------------------------------ adapters (speclora.adapters)

    def load_lora_adapter(
        self, model: nn.Module, adapter_path: str | os.PathLike[str], fuse: bool = True
    ) -> None:
        """:func:`speclora.adapters.load_adapter`."""
        adapters.load_adapter(model, adapter_path, fuse)

    def unload_lora_adapter(self, model: nn.Module) -> bool:
        """:func:`speclora.adapters.unload_adapter`."""
        return adapters.unload_adapter(model)

    def adapter_info(self, model: nn.Module) -> dict[str, Any]:
        """:func:`speclora.adapters.adapter_info`."""
        return adapters.adapter_info(model)

    def loaded_adapter(self, model: nn.Module) -> tuple[Path, dict[str, mx.array]] | None:
        """:func:`speclora.adapters.loaded_adapter`."""
        return adapters.loaded_adapter(model)

    resolve_adapter_path = staticmethod(adapters.resolve_adapter_path)
