"""Validated configuration: the sections of ``configs/config.yaml`` as dataclasses.

Every section is optional and every key has a default. Validation refuses unknown
sections and keys, wrong types (a bool is not an integer) and out-of-range values
with a ``ValueError`` that names the dotted key, the offending value and what is
allowed. Every numeric key has an upper bound that the code the value reaches can
hold (MLX's int32 sizes, SQLite's int64, the uint64 seed, float32 arithmetic), so
a config that validates never fails later on the size of a number. Path values
have ``~`` expanded and relative paths resolved against the config file's
directory (``load_config``) or the current directory.
"""

from __future__ import annotations

import abc
import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeGuard

import yaml

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

ADAPTER_ALIASES = ("active", "previous", "best", "final", "latest")
"""Names of the checkpoints under ``training.checkpoint_dir``: the trainer writes
best/final/latest; active is the promoted adapter that systems serve, previous
the one before it."""

BASE_DRAFT = "base"
"""``models.draft_adapter`` value that pins the base draft (no adapter, not even
the active one)."""

GENERATION_MODES = ("fast", "detailed")

QUANTIZE_BITS = (2, 3, 4, 5, 6, 8)
"""Weight widths MLX's affine quantization supports."""
QUANTIZE_GROUP_SIZES = (32, 64, 128)
MODEL_DTYPES = ("auto", "float32", "float16", "bfloat16")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ZOO_PREFIX = "zoo:"
"""Model references starting with this name a model shipped with the package."""
_DEFAULT_MAX_DRAFT_TOKENS = 8

# Upper bounds of the numeric keys: what the code each value reaches can hold.
_INT32_MAX = 2**31 - 1
"""Counts of tokens, examples, steps and layers: MLX sizes and positions are int32."""
_INT64_MAX = 2**63 - 1
"""Largest SQLite integer (the replay buffer's size bounds a query)."""
_UINT64_MAX = 2**64 - 1
"""Largest seed ``mx.random.seed`` accepts (an unsigned 64-bit integer)."""
_MAX_KV_SIZE = 2**30
"""The ring buffer's int32 slots hold the window plus its rollback headroom."""
_MAX_MEMORY_GB = 2**20
"""1 PiB; the limit is passed to ``mx.set_memory_limit`` in bytes, as a size_t."""
_MAX_LORA_RANK = 4096
"""Full rank for most models LoRA is used on; memory grows linearly with it."""
_MAX_LORA_ALPHA = 1.0e4
"""``alpha / rank`` scales activations: keep it well inside float16's 65504."""
_MIN_TEMPERATURE, _MAX_TEMPERATURE = 0.01, 100.0
"""Logits are multiplied by ``1 / temperature`` in float32, which overflows to inf for
tiny temperatures (sampling then gives NaN); beyond 100 any distribution is flat."""
_MAX_DISTILL_WEIGHT = 1000.0
"""A term 1000 times the cross-entropy already drowns it; the loss stays far from
float32 overflow."""
_MAX_GRAD_CLIP = 1.0e6
"""A clip no gradient reaches; larger values only need to stay finite in float32."""
_MAX_QUEUE_SIZE = 2**20
"""Waiting requests each hold their body and an open connection; a million is already
more than one process can keep open."""


def _num(x: float) -> str:
    """A bound as written in messages: integers in full, floats shortest."""
    if isinstance(x, int) or (x.is_integer() and abs(x) < 2**53):
        return str(int(x))
    return repr(x)


def _show(value: Any, type_ok: bool) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return text if type_ok else f"{text} ({type(value).__name__})"


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# PyYAML (YAML 1.1) reads a float only with a dot, and an exponent only when signed:
# 1e-4 and 1.0e300 are strings, 1.0e-4 and 1.0e+300 are floats.
_EXPONENT = re.compile(r"([-+]?[0-9_]*)(\.[0-9_]*)?[eE]([-+]?)([0-9]+)")


def _signed_exponent(text: str) -> str:
    m = _EXPONENT.fullmatch(text)
    if not m:
        return text
    mantissa, fraction, sign, power = m.groups()
    return f"{mantissa}{fraction or '.0'}e{sign or '+'}{power}"


def _yaml_number(text: str, *, integer: bool) -> str | None:
    """How to write the number in ``text`` so that YAML reads a number, or None."""
    s = text.strip()
    try:
        number = float(s)
    except ValueError:
        return None
    if not math.isfinite(number) or (integer and not number.is_integer()):
        return None
    if integer:
        candidates = [s, str(int(number))]
    else:
        candidates = [_signed_exponent(s), _signed_exponent(repr(number))]
    for candidate in candidates:
        try:
            value = yaml.safe_load(f"v: {candidate}")["v"]
        except (yaml.YAMLError, ValueError):
            continue
        if (_is_int(value) if integer else _is_number(value)) and value == number:
            return candidate
    return None


class _Rule(abc.ABC):
    """What a key accepts: ``check`` returns the normalized value or raises."""

    text: str

    @abc.abstractmethod
    def accepts(self, value: Any) -> tuple[bool, bool, Any]:
        """Returns (type is right, value is allowed, normalized value)."""

    def check(self, key: str, value: Any) -> Any:
        type_ok, ok, normalized = self.accepts(value)
        if ok:
            return normalized
        hint = ""
        if isinstance(value, str) and isinstance(self, (_Int, _Number)):
            integer = isinstance(self, _Int)
            written = _yaml_number(value, integer=integer)
            if written == value.strip():
                hint = f" (a string: write {written} without quotes)"
            elif written is not None and not integer and _EXPONENT.search(value):
                hint = (
                    " (YAML reads this as a string: an exponent needs a dot and a "
                    f"sign, as in {written})"
                )
            elif written is not None:
                hint = f" (YAML reads this as a string: write {written})"
        raise ValueError(
            f"{key} must be {self.text}, got {_show(value, type_ok)}{hint}"
        )


def _range_text(
    lo: float | None, hi: float | None, lo_open: bool, hi_open: bool
) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_num(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {_num(hi)}"
    return ""


class _Int(_Rule):
    def __init__(
        self,
        lo: int | None = None,
        hi: int | None = None,
        *,
        nullable: bool = False,
        also: tuple[int, ...] = (),
        text: str | None = None,
    ):
        self.lo, self.hi, self.nullable, self.also = lo, hi, nullable, also
        default = f"an integer {_range_text(lo, hi, False, False)}".rstrip()
        self.text = text or (f"null or {default}" if nullable else default)

    def accepts(self, value: Any) -> tuple[bool, bool, Any]:
        if value is None:
            return self.nullable, self.nullable, None
        if not _is_int(value):
            return False, False, value
        if value in self.also:
            return True, True, value
        ok = (self.lo is None or value >= self.lo) and (
            self.hi is None or value <= self.hi
        )
        return True, ok, value


class _Number(_Rule):
    def __init__(
        self,
        lo: float | None = None,
        hi: float | None = None,
        *,
        lo_open: bool = False,
        hi_open: bool = False,
        nullable: bool = False,
        also: tuple[float, ...] = (),
        text: str | None = None,
    ):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        self.nullable, self.also = nullable, also
        bounds = _range_text(lo, hi, lo_open, hi_open)
        default = f"a finite number {bounds}".rstrip()
        self.text = text or (f"null or {default}" if nullable else default)

    def accepts(self, value: Any) -> tuple[bool, bool, Any]:
        if value is None:
            return self.nullable, self.nullable, None
        if not _is_number(value):
            return False, False, value
        try:
            x = float(value)
        except OverflowError:  # an integer beyond any float
            return True, False, value
        if not math.isfinite(x):
            return True, False, value
        if x in self.also:
            return True, True, x
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return True, False, value
        if self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi):
            return True, False, value
        return True, True, x


class _Bool(_Rule):
    text = "true or false"

    def accepts(self, value: Any) -> tuple[bool, bool, Any]:
        ok = isinstance(value, bool)
        return ok, ok, value


class _Str(_Rule):
    def __init__(
        self,
        *,
        choices: tuple[str, ...] = (),
        nullable: bool = False,
        upper: bool = False,
    ):
        self.choices, self.nullable, self.upper = choices, nullable, upper
        if choices:
            default = "one of " + ", ".join(repr(c) for c in choices)
        else:
            default = "a non-empty string"
        self.text = f"null or {default}" if nullable else default

    def accepts(self, value: Any) -> tuple[bool, bool, Any]:
        if value is None:
            return self.nullable, self.nullable, None
        if not isinstance(value, str):
            return False, False, value
        normalized = value.upper() if self.upper else value
        if self.choices:
            return True, normalized in self.choices, normalized
        return True, bool(value.strip()), value


class _StrList(_Rule):
    def __init__(self, *, nonempty: bool):
        self.nonempty = nonempty
        self.text = (
            "a non-empty list" if nonempty else "a list"
        ) + " of non-empty strings"

    def accepts(self, value: Any) -> tuple[bool, bool, Any]:
        if not isinstance(value, (list, tuple)):
            return False, False, value
        ok = all(isinstance(v, str) and v.strip() for v in value)
        ok = ok and (bool(value) or not self.nonempty)
        return True, ok, list(value)


def _opt(default: Any, rule: _Rule, help: str) -> Any:
    """A dataclass field with its validation rule and help text."""
    if isinstance(default, list):
        return field(
            default_factory=lambda: list(default), metadata={"help": help, "rule": rule}
        )
    return field(default=default, metadata={"help": help, "rule": rule})


def _absolute(path: str, base_dir: Path) -> str:
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = base_dir / p
    return os.path.normpath(p)


def _is_path_like(ref: str) -> bool:
    return ref.startswith((".", "~", "/")) or Path(ref).is_absolute()


class _Section:
    """Shared validation for the config sections (dataclasses below)."""

    section: ClassVar[str]
    path_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            rule: _Rule = f.metadata["rule"]
            setattr(
                self,
                f.name,
                rule.check(f"{self.section}.{f.name}", getattr(self, f.name)),
            )
        self._check_together()

    def _check_together(self) -> None:
        """Constraints between keys of the section."""

    @classmethod
    def _complete(cls, d: dict[str, Any]) -> dict[str, Any]:
        """Defaults that depend on other keys given."""
        return d

    def _resolve_paths(self, base_dir: Path) -> None:
        for name in self.path_fields:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _absolute(value, base_dir))

    @classmethod
    def from_dict(
        cls,
        d: Mapping[str, Any] | None,
        *,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> Self:
        """Validate one section.

        Args:
            d (Mapping[str, Any] | None): The section's keys; ``None`` or a missing
                key takes the default.
            base_dir (str | PathLike, optional): Directory relative paths resolve
                against. Default: the current working directory.

        Returns:
            The validated section, with paths made absolute.
        """
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise ValueError(
                f"{cls.section} must be a mapping of keys to values, got {_show(d, False)}"
            )
        allowed = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        for key in d:
            if key not in allowed:
                raise ValueError(
                    _unknown(f"key '{cls.section}.{key}'", str(key), allowed)
                )
        section = cls(**cls._complete(dict(d)))
        section._resolve_paths(
            Path(base_dir).expanduser() if base_dir is not None else Path.cwd()
        )
        return section

    def to_dict(self) -> dict[str, Any]:
        """The section as a plain dict (lists copied)."""
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, list) else value
        return out


def _unknown(what: str, name: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown {what} (allowed: {', '.join(allowed)}){hint}"


@dataclass
class ModelsConfig(_Section):
    """Which target and draft models to load, and the draft's starting adapter."""

    section: ClassVar[str] = "models"

    target: str = _opt(
        "zoo:target",
        _Str(),
        "Target model: a local directory, a Hugging Face hub id, or zoo:NAME for a shipped model.",
    )
    draft: str = _opt(
        "zoo:draft",
        _Str(),
        "Draft model (same forms as target); must share the target's tokenizer and vocabulary.",
    )
    draft_adapter: str | None = _opt(
        None,
        _Str(nullable=True),
        "Adapter to serve: null = the active one under training.checkpoint_dir (the "
        "last promoted, followed as it changes), base = none, or a fixed directory or "
        "alias (active/previous/best/final/latest).",
    )
    dtype: str = _opt(
        "auto",
        _Str(choices=MODEL_DTYPES),
        "Floating-point type the models compute in: auto (float32 on CPU, where half "
        "precision has no fast matmul; the stored type on a GPU), float32, float16, bfloat16.",
    )
    quantize_bits: int | None = _opt(
        None,
        _Int(9, 8, nullable=True, also=QUANTIZE_BITS, text="null or one of [2, 3, 4, 5, 6, 8]"),
        "Quantize both models' weights to this many bits at load (mlx-lm's affine "
        "quantization; models already quantized stay as they are); null keeps them.",
    )
    quantize_group_size: int = _opt(
        64,
        _Int(129, 128, also=QUANTIZE_GROUP_SIZES, text="one of [32, 64, 128]"),
        "Weights per quantization scale when quantize_bits is set.",
    )

    def _resolve_paths(self, base_dir: Path) -> None:
        # Model references are hub ids unless they look like paths or name an
        # existing directory; a hub id like "org/name" is also a relative path.
        for name in ("target", "draft"):
            ref = getattr(self, name)
            if ref.startswith(ZOO_PREFIX):
                continue
            if _is_path_like(ref) or (base_dir / ref).exists():
                setattr(self, name, _absolute(ref, base_dir))
        if self.draft_adapter not in (None, BASE_DRAFT, *ADAPTER_ALIASES):
            self.draft_adapter = _absolute(self.draft_adapter, base_dir)


@dataclass
class GenerationConfig(_Section):
    """Decoding settings."""

    section: ClassVar[str] = "generation"

    mode: str = _opt(
        "fast",
        _Str(choices=GENERATION_MODES),
        "fast: fused decoding; detailed: also records disagreements.",
    )
    max_tokens: int = _opt(
        128, _Int(1, _INT32_MAX), "Maximum number of tokens generated per prompt."
    )
    temperature: float = _opt(
        0.0,
        _Number(
            _MIN_TEMPERATURE,
            _MAX_TEMPERATURE,
            also=(0.0,),
            text=f"0 (greedy) or a finite number in [{_num(_MIN_TEMPERATURE)}, "
            f"{_num(_MAX_TEMPERATURE)}]",
        ),
        "Sampling temperature; 0 is greedy.",
    )
    top_p: float = _opt(
        1.0, _Number(0.0, 1.0, lo_open=True), "Nucleus sampling mass; 1 disables it."
    )
    top_k: int = _opt(
        0, _Int(0, _INT32_MAX), "Keep only the k most likely tokens; 0 disables it."
    )
    min_p: float = _opt(
        0.0,
        _Number(0.0, 1.0, hi_open=True),
        "Drop tokens below min_p times the top probability; 0 disables it.",
    )
    num_draft_tokens: int = _opt(
        4,
        _Int(1, 32),
        "Tokens the draft proposes per verification step (initial value when adaptive).",
    )
    adaptive_draft: bool = _opt(
        True, _Bool(), "Adapt the number of draft tokens to the recent acceptance rate."
    )
    max_draft_tokens: int = _opt(
        _DEFAULT_MAX_DRAFT_TOKENS,
        _Int(1, 32),
        "Upper bound for adaptive drafting; >= num_draft_tokens (defaults to it when larger than 8).",
    )
    ngram_proposer: bool = _opt(
        True,
        _Bool(),
        "Adaptive drafting may also propose tokens by prompt lookup (no model call).",
    )
    use_chat_template: bool = _opt(
        True, _Bool(), "Format prompts with the tokenizer's chat template."
    )
    stop_tokens: list[str] = _opt(  # noqa: RUF009 (_opt wraps dataclasses.field)
        [], _StrList(nonempty=False), "Extra strings that end generation (besides EOS)."
    )
    max_kv_size: int | None = _opt(
        None,
        _Int(16, _MAX_KV_SIZE, nullable=True),
        "Sliding-window KV cache size in tokens; null keeps all.",
    )
    seed: int | None = _opt(
        None,
        _Int(0, _UINT64_MAX, nullable=True),
        "Random seed for sampling; null leaves MLX's state alone.",
    )
    memory_limit_gb: float | None = _opt(
        None,
        _Number(0.0, _MAX_MEMORY_GB, lo_open=True, nullable=True),
        "MLX memory limit in GiB; null keeps MLX's default.",
    )

    @classmethod
    def _complete(cls, d: dict[str, Any]) -> dict[str, Any]:
        # Asking for more draft tokens than the default bound raises the bound too.
        n = d.get("num_draft_tokens")
        if "max_draft_tokens" not in d and _is_int(n) and n > _DEFAULT_MAX_DRAFT_TOKENS:
            d["max_draft_tokens"] = n
        return d

    def _check_together(self) -> None:
        if self.max_draft_tokens < self.num_draft_tokens:
            raise ValueError(
                f"generation.max_draft_tokens must be >= generation.num_draft_tokens "
                f"({self.num_draft_tokens}), got {self.max_draft_tokens}"
            )


@dataclass
class CollectionConfig(_Section):
    """Where and when low-acceptance generations are kept for training."""

    section: ClassVar[str] = "collection"
    path_fields: ClassVar[tuple[str, ...]] = ("data_dir",)

    data_dir: str = _opt(
        "~/.cache/speclora/failures",
        _Str(),
        "Directory for collected failures and the replay buffer.",
    )
    acceptance_threshold: float = _opt(
        0.5,
        _Number(0.0, 1.0),
        "A detailed-mode generation below this acceptance rate is a failure.",
    )
    replay_buffer_max_size: int = _opt(
        100,
        _Int(0, _INT64_MAX),
        "Examples kept for replay after training; 0 keeps none.",
    )
    top_k_logprobs: int = _opt(
        20, _Int(1, 256), "Target log-probabilities recorded per disagreement."
    )
    tracker_window: int = _opt(
        20, _Int(1, _INT32_MAX), "Generations averaged for the recent acceptance rate."
    )


@dataclass
class TrainingConfig(_Section):
    """LoRA training of the draft on collected failures."""

    section: ClassVar[str] = "training"
    path_fields: ClassVar[tuple[str, ...]] = ("checkpoint_dir",)

    rank: int = _opt(8, _Int(1, _MAX_LORA_RANK), "LoRA rank.")
    alpha: float = _opt(
        16.0,
        _Number(0.0, _MAX_LORA_ALPHA, lo_open=True),
        "LoRA alpha; the update is scaled by alpha / rank.",
    )
    dropout: float = _opt(
        0.0,
        _Number(0.0, 1.0, hi_open=True),
        "Dropout on the LoRA input during training.",
    )
    target_modules: list[str] = _opt(  # noqa: RUF009 (_opt wraps dataclasses.field)
        ["q_proj", "v_proj"],
        _StrList(nonempty=True),
        "Linear layers that get LoRA, by name.",
    )
    num_layers: int = _opt(
        -1,
        _Int(
            1,
            _INT32_MAX,
            also=(-1,),
            text=f"-1 (all layers) or an integer in [1, {_INT32_MAX}]",
        ),
        "LoRA on the last num_layers blocks; -1 means all.",
    )
    learning_rate: float = _opt(
        1e-3, _Number(0.0, 1.0, lo_open=True), "AdamW learning rate."
    )
    num_epochs: int = _opt(
        3, _Int(1, _INT32_MAX), "Passes over the training examples per train() call."
    )
    batch_size: int = _opt(4, _Int(1, _INT32_MAX), "Sequences per optimizer step.")
    min_examples: int = _opt(
        8, _Int(1, _INT32_MAX), "Failures required before training runs."
    )
    max_seq_length: int = _opt(
        512, _Int(8, _INT32_MAX), "Sequences are truncated to this many tokens."
    )
    distill_weight: float = _opt(
        0.5,
        _Number(0.0, _MAX_DISTILL_WEIGHT),
        "Weight of the distillation term at disagreement positions.",
    )
    distill_temperature: float = _opt(
        1.0,
        _Number(_MIN_TEMPERATURE, _MAX_TEMPERATURE),
        "Temperature of the distillation term.",
    )
    replay_ratio: float = _opt(
        0.25,
        _Number(0.0, 1.0),
        "Share of replay-buffer examples mixed into each epoch.",
    )
    eval_fraction: float = _opt(
        0.1,
        _Number(0.0, 0.5),
        "Share of examples held out to pick the best checkpoint.",
    )
    checkpoint_dir: str = _opt(
        "~/.cache/speclora/checkpoints",
        _Str(),
        "Directory holding the best/, final/ and latest/ checkpoints.",
    )
    seed: int = _opt(
        0, _Int(0, _UINT64_MAX), "Seed for shuffling, dropout and LoRA initialization."
    )
    grad_clip: float | None = _opt(
        1.0,
        _Number(0.0, _MAX_GRAD_CLIP, lo_open=True, nullable=True),
        "Clip the gradient norm to this value; null disables clipping.",
    )
    auto: bool = _opt(
        False,
        _Bool(),
        "Train in the background, without pausing generation, whenever detailed "
        "generations have collected min_examples failures.",
    )


@dataclass
class LoggingConfig(_Section):
    """Logging and progress output."""

    section: ClassVar[str] = "logging"

    level: str = _opt(
        "INFO", _Str(choices=LOG_LEVELS, upper=True), "Log level (case-insensitive)."
    )
    show_progress: bool = _opt(
        True, _Bool(), "Show progress bars for batches and training."
    )


@dataclass
class ServeConfig(_Section):
    """``speclora serve``: the HTTP server in front of one system."""

    section: ClassVar[str] = "serve"

    host: str = _opt(
        "127.0.0.1",
        _Str(),
        "Address to listen on; the default accepts connections from this machine only.",
    )
    port: int = _opt(
        8080, _Int(0, 65535), "TCP port to listen on; 0 picks a free one (printed at start)."
    )
    api_key: str | None = _opt(
        None,
        _Str(nullable=True),
        "When set, every /v1 request must carry 'Authorization: Bearer <api_key>'.",
    )
    queue_size: int = _opt(
        16,
        _Int(0, _MAX_QUEUE_SIZE),
        "Requests that may wait while one generates; beyond it the server answers 429.",
    )
    learn: bool = _opt(
        True,
        _Bool(),
        "Learn from served requests: record them in detailed mode (unless a request "
        "asks for fast) and train in the background (training.auto). false serves "
        "with generation.mode and training.auto as configured.",
    )
    model_name: str | None = _opt(
        None,
        _Str(nullable=True),
        "Model id in /v1/models and responses; null = the target's name.",
    )


_SECTIONS: dict[str, type[_Section]] = {
    "models": ModelsConfig,
    "generation": GenerationConfig,
    "collection": CollectionConfig,
    "training": TrainingConfig,
    "logging": LoggingConfig,
    "serve": ServeConfig,
}


@dataclass
class Config:
    """The whole configuration, one attribute per section."""

    models: ModelsConfig = field(
        default_factory=ModelsConfig, metadata={"help": "Target and draft models."}
    )
    generation: GenerationConfig = field(
        default_factory=GenerationConfig, metadata={"help": "Decoding settings."}
    )
    collection: CollectionConfig = field(
        default_factory=CollectionConfig, metadata={"help": "Failure collection."}
    )
    training: TrainingConfig = field(
        default_factory=TrainingConfig, metadata={"help": "LoRA training of the draft."}
    )
    logging: LoggingConfig = field(
        default_factory=LoggingConfig, metadata={"help": "Logging and progress output."}
    )
    serve: ServeConfig = field(
        default_factory=ServeConfig, metadata={"help": "The HTTP server (speclora serve)."}
    )

    @classmethod
    def from_dict(
        cls,
        d: Mapping[str, Any] | None,
        *,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> Config:
        """Validate a parsed config.

        Args:
            d (Mapping[str, Any] | None): Sections to values, as parsed from YAML;
                missing sections and keys take their defaults.
            base_dir (str | PathLike, optional): Directory relative paths resolve
                against. Default: the current working directory.

        Returns:
            Config: The validated config, with paths made absolute.
        """
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise ValueError(
                f"config must be a mapping of sections, got {_show(d, False)}"
            )
        for name in d:
            if name not in _SECTIONS:
                raise ValueError(
                    _unknown(f"section '{name}'", str(name), list(_SECTIONS))
                )
        sections = {
            name: kind.from_dict(d.get(name), base_dir=base_dir)
            for name, kind in _SECTIONS.items()
        }
        return cls(**sections)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The complete config as plain nested dicts."""
        return {name: getattr(self, name).to_dict() for name in _SECTIONS}


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read, validate and complete a YAML config file.

    Only plain YAML is read (``yaml.safe_load``): tags that construct Python
    objects are refused.

    Args:
        path (str | PathLike): The YAML file.

    Returns:
        dict: Every section and key, defaults filled in, paths absolute (relative
        ones resolved against the file's directory).
    """
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"config file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read config file {p}: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"config file {p} is not valid plain YAML: {e}") from e
    except RecursionError:
        # PyYAML composes nested collections recursively.
        raise ValueError(f"config file {p} nests collections too deeply") from None
    except ValueError as e:
        # Scalars PyYAML cannot convert, e.g. an integer of thousands of digits.
        raise ValueError(f"config file {p} holds an unreadable value: {e}") from e
    try:
        return Config.from_dict(data, base_dir=p.resolve().parent).to_dict()
    except ValueError as e:
        raise ValueError(f"config file {p}: {e}") from e
