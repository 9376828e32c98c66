"""Validated configuration: the sections of ``configs/config.yaml`` as dataclasses
validated by pydantic (see :mod:`speclora.validation`).

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

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, get_origin

import yaml
from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from speclora.validation import CONFIG, HERE, accepts, build, show, unknown, validated

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


def _opt(default: Any, help: str, **rules: Any) -> Any:
    """A field with its help text and pydantic ``Field`` constraints (``ge``, ``lt``
    ...), ``enum`` (the values allowed) and ``also`` (values allowed outside the
    range, mapped to what they mean)."""
    extra = {k: rules.pop(k) for k in ("enum", "also") if k in rules}
    metadata = {"help": help, "description": help, "json_schema_extra": extra, **rules}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


_Text = Annotated[str, Field(min_length=1, pattern=r"\S")]
"""A string with something besides whitespace."""


def _absolute(path: str, base_dir: Path) -> str:
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = base_dir / p
    return os.path.normpath(p)


def _is_path_like(ref: str) -> bool:
    return ref.startswith((".", "~", "/")) or Path(ref).is_absolute()


_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


class _Section:
    """Shared validation for the config sections (pydantic dataclasses below)."""

    path_fields: ClassVar[tuple[str, ...]] = ()

    @field_validator("*", mode="wrap")
    @classmethod
    def _declared(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        """What pydantic's constraints do not express: ``also``, ``enum``, tuples."""
        declared = cls.__pydantic_fields__[info.field_name]  # type: ignore[attr-defined,index]
        extra = declared.json_schema_extra
        if isinstance(value, tuple) and get_origin(declared.annotation) is list:
            value = list(value)
        try:
            value = handler(value)
        except ValidationError as e:
            if all(err["type"] in _RANGE_ERRORS for err in e.errors()):
                for allowed in extra.get("also", ()):
                    if value == allowed:
                        return allowed
            raise
        if value is not None and value not in extra.get("enum", (value,)):
            raise ValueError(accepts(declared))
        return value

    @classmethod
    def _complete(cls, d: Any) -> Any:
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
        section = build(cls, cls._complete({} if d is None else d))
        section._resolve_paths(
            Path(base_dir).expanduser() if base_dir is not None else Path.cwd()
        )
        return section

    def to_dict(self) -> dict[str, Any]:
        """The section as a plain dict (lists copied)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        return {k: list(v) if isinstance(v, list) else v for k, v in values.items()}


# Strict: a bool is not an integer, "0.5" not a number.
@validated("models", style=CONFIG, strict=True)
class ModelsConfig(_Section):
    """Which target and draft models to load, and the draft's starting adapter."""

    target: _Text = _opt(
        "zoo:target",
        "Target model: a local directory, a Hugging Face hub id, or zoo:NAME for a shipped model.",
    )
    draft: _Text = _opt(
        "zoo:draft",
        "Draft model (same forms as target); must share the target's tokenizer and vocabulary.",
    )
    draft_adapter: _Text | None = _opt(
        None,
        "Adapter to serve: null = the active one under training.checkpoint_dir (the "
        "last promoted, followed as it changes), base = none, or a fixed directory or "
        "alias (active/previous/best/final/latest).",
    )
    dtype: str = _opt(
        "auto",
        "Floating-point type the models compute in: auto (float32 on CPU, where half "
        "precision has no fast matmul; the stored type on a GPU), float32, float16, bfloat16.",
        enum=MODEL_DTYPES,
    )
    quantize_bits: int | None = _opt(
        None,
        "Quantize both models' weights to this many bits at load (mlx-lm's affine "
        "quantization; models already quantized stay as they are); null keeps them.",
        enum=QUANTIZE_BITS,
    )
    quantize_group_size: int = _opt(
        64,
        "Weights per quantization scale when quantize_bits is set.",
        enum=QUANTIZE_GROUP_SIZES,
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


@validated("generation", style=CONFIG, strict=True)
class GenerationConfig(_Section):
    """Decoding settings."""

    mode: str = _opt(
        "fast",
        "fast: fused decoding; detailed: also records disagreements.",
        enum=GENERATION_MODES,
    )
    max_tokens: int = _opt(
        128, "Maximum number of tokens generated per prompt.", ge=1, le=_INT32_MAX
    )
    temperature: float = _opt(
        0.0,
        "Sampling temperature; 0 is greedy.",
        ge=_MIN_TEMPERATURE,
        le=_MAX_TEMPERATURE,
        also={0.0: "greedy"},
    )
    top_p: float = _opt(1.0, "Nucleus sampling mass; 1 disables it.", gt=0, le=1)
    top_k: int = _opt(
        0, "Keep only the k most likely tokens; 0 disables it.", ge=0, le=_INT32_MAX
    )
    min_p: float = _opt(
        0.0,
        "Drop tokens below min_p times the top probability; 0 disables it.",
        ge=0,
        lt=1,
    )
    num_draft_tokens: int = _opt(
        4,
        "Tokens the draft proposes per verification step (initial value when adaptive).",
        ge=1,
        le=32,
    )
    adaptive_draft: bool = _opt(
        True, "Adapt the number of draft tokens to the recent acceptance rate."
    )
    max_draft_tokens: int = _opt(
        _DEFAULT_MAX_DRAFT_TOKENS,
        "Upper bound for adaptive drafting; >= num_draft_tokens (defaults to it when larger than 8).",
        ge=1,
        le=32,
    )
    ngram_proposer: bool = _opt(
        True,
        "Adaptive drafting may also propose tokens by prompt lookup (no model call).",
    )
    use_chat_template: bool = _opt(
        True, "Format prompts with the tokenizer's chat template."
    )
    stop_tokens: list[_Text] = _opt(
        [], "Extra strings that end generation (besides EOS)."
    )
    max_kv_size: int | None = _opt(
        None,
        "Sliding-window KV cache size in tokens; null keeps all.",
        ge=16,
        le=_MAX_KV_SIZE,
    )
    seed: int | None = _opt(
        None,
        "Random seed for sampling; null leaves MLX's state alone.",
        ge=0,
        le=_UINT64_MAX,
    )
    memory_limit_gb: float | None = _opt(
        None,
        "MLX memory limit in GiB; null keeps MLX's default.",
        gt=0,
        le=_MAX_MEMORY_GB,
    )

    @classmethod
    def _complete(cls, d: Any) -> Any:
        # Asking for more draft tokens than the default bound raises the bound too.
        if not isinstance(d, Mapping) or "max_draft_tokens" in d:
            return d
        n = d.get("num_draft_tokens")
        if type(n) is int and n > _DEFAULT_MAX_DRAFT_TOKENS:
            return {**d, "max_draft_tokens": n}
        return d

    def __post_init__(self) -> None:
        # Constraints between keys, checked once each key is valid.
        if self.max_draft_tokens < self.num_draft_tokens:
            raise ValueError(
                f"{HERE}.max_draft_tokens must be >= {HERE}.num_draft_tokens "
                f"({self.num_draft_tokens}), got {self.max_draft_tokens}"
            )


@validated("collection", style=CONFIG, strict=True)
class CollectionConfig(_Section):
    """Where and when low-acceptance generations are kept for training."""

    path_fields: ClassVar[tuple[str, ...]] = ("data_dir",)

    data_dir: _Text = _opt(
        "~/.cache/speclora/failures",
        "Directory for collected failures and the replay buffer.",
    )
    acceptance_threshold: float = _opt(
        0.5,
        "A detailed-mode generation below this acceptance rate is a failure.",
        ge=0,
        le=1,
    )
    replay_buffer_max_size: int = _opt(
        100,
        "Examples kept for replay after training; 0 keeps none.",
        ge=0,
        le=_INT64_MAX,
    )
    top_k_logprobs: int = _opt(
        20, "Target log-probabilities recorded per disagreement.", ge=1, le=256
    )
    tracker_window: int = _opt(
        20, "Generations averaged for the recent acceptance rate.", ge=1, le=_INT32_MAX
    )


@validated("training", style=CONFIG, strict=True)
class TrainingConfig(_Section):
    """LoRA training of the draft on collected failures."""

    path_fields: ClassVar[tuple[str, ...]] = ("checkpoint_dir",)

    rank: int = _opt(8, "LoRA rank.", ge=1, le=_MAX_LORA_RANK)
    alpha: float = _opt(
        16.0,
        "LoRA alpha; the update is scaled by alpha / rank.",
        gt=0,
        le=_MAX_LORA_ALPHA,
    )
    dropout: float = _opt(0.0, "Dropout on the LoRA input during training.", ge=0, lt=1)
    target_modules: list[_Text] = _opt(
        ["q_proj", "v_proj"], "Linear layers that get LoRA, by name.", min_length=1
    )
    num_layers: int = _opt(
        -1,
        "LoRA on the last num_layers blocks; -1 means all.",
        ge=1,
        le=_INT32_MAX,
        also={-1: "all layers"},
    )
    learning_rate: float = _opt(1e-3, "AdamW learning rate.", gt=0, le=1)
    num_epochs: int = _opt(
        3, "Passes over the training examples per train() call.", ge=1, le=_INT32_MAX
    )
    batch_size: int = _opt(4, "Sequences per optimizer step.", ge=1, le=_INT32_MAX)
    min_examples: int = _opt(
        8, "Failures required before training runs.", ge=1, le=_INT32_MAX
    )
    max_seq_length: int = _opt(
        512, "Sequences are truncated to this many tokens.", ge=8, le=_INT32_MAX
    )
    distill_weight: float = _opt(
        0.5,
        "Weight of the distillation term at disagreement positions.",
        ge=0,
        le=_MAX_DISTILL_WEIGHT,
    )
    distill_temperature: float = _opt(
        1.0,
        "Temperature of the distillation term.",
        ge=_MIN_TEMPERATURE,
        le=_MAX_TEMPERATURE,
    )
    replay_ratio: float = _opt(
        0.25, "Share of replay-buffer examples mixed into each epoch.", ge=0, le=1
    )
    eval_fraction: float = _opt(
        0.1, "Share of examples held out to pick the best checkpoint.", ge=0, le=0.5
    )
    checkpoint_dir: _Text = _opt(
        "~/.cache/speclora/checkpoints",
        "Directory holding the best/, final/ and latest/ checkpoints.",
    )
    seed: int = _opt(
        0, "Seed for shuffling, dropout and LoRA initialization.", ge=0, le=_UINT64_MAX
    )
    grad_clip: float | None = _opt(
        1.0,
        "Clip the gradient norm to this value; null disables clipping.",
        gt=0,
        le=_MAX_GRAD_CLIP,
    )
    auto: bool = _opt(
        False,
        "Train in the background, without pausing generation, whenever detailed "
        "generations have collected min_examples failures.",
    )


@validated("logging", style=CONFIG, strict=True)
class LoggingConfig(_Section):
    """Logging and progress output."""

    level: str = _opt("INFO", "Log level (case-insensitive).", enum=LOG_LEVELS)
    show_progress: bool = _opt(True, "Show progress bars for batches and training.")

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


@validated("serve", style=CONFIG, strict=True)
class ServeConfig(_Section):
    """``speclora serve``: the HTTP server in front of one system."""

    host: _Text = _opt(
        "127.0.0.1",
        "Address to listen on; the default accepts connections from this machine only.",
    )
    port: int = _opt(
        8080,
        "TCP port to listen on; 0 picks a free one (printed at start).",
        ge=0,
        le=65535,
    )
    api_key: _Text | None = _opt(
        None,
        "When set, every /v1 request must carry 'Authorization: Bearer <api_key>'.",
    )
    queue_size: int = _opt(
        16,
        "Requests that may wait while one generates; beyond it the server answers 429.",
        ge=0,
        le=_MAX_QUEUE_SIZE,
    )
    learn: bool = _opt(
        True,
        "Learn from served requests: record them in detailed mode (unless a request "
        "asks for fast) and train in the background (training.auto). false serves "
        "with generation.mode and training.auto as configured.",
    )
    model_name: _Text | None = _opt(
        None, "Model id in /v1/models and responses; null = the target's name."
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
        default_factory=ServeConfig,
        metadata={"help": "The HTTP server (speclora serve)."},
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
                f"config must be a mapping of sections, got {show(d, type_ok=False)}"
            )
        for name in d:
            if name not in _SECTIONS:
                raise ValueError(
                    unknown(f"section '{name}'", str(name), list(_SECTIONS))
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
