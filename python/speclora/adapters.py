"""LoRA adapters on a model: read, apply, fuse, swap back exactly, resolve aliases.

Adapters use mlx-lm's format and layers (``adapter_config.json`` +
``adapters.safetensors``; ``linear_to_lora_layers``, ``LoRALinear``), so an adapter
trained here works with ``mlx_lm.generate --adapter-path`` and back. Files are read
through :func:`speclora.checkpoint.reading`, so a concurrent save of a checkpoint
alias never mixes two versions into one load.

What this adds over mlx-lm's ``load_adapters``: validation that names the file and
the problem before the model is touched, and exact swapping. The first adapter load
of a model keeps references to its base modules and weights (no copy: MLX arrays
are immutable) and unloading puts them back, so the base model's logits come back
bit for bit, also after a fused adapter.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from speclora.checkpoint import ADAPTER_CONFIG_FILE as ADAPTER_CONFIG
from speclora.checkpoint import ADAPTER_WEIGHTS_FILE as ADAPTER_WEIGHTS
from speclora.checkpoint import reading
from speclora.config import ADAPTER_ALIASES

LORA_LAYER_TYPES = (LoRALinear, LoRASwitchLinear, LoRAEmbedding)


@dataclass
class _Adapter:
    """An adapter currently applied to a model."""

    path: Path
    source: Path  # the directory read: what ``path`` named at load time
    files: _AdapterFiles  # as read: training continues from these weights
    rank: int
    alpha: float
    target_modules: list[str]
    fused: bool


@dataclass
class _ModelState:
    """What it takes to give a model back its base weights and structure."""

    base_modules: dict[str, nn.Module]  # module path -> the base module object
    base_params: list[tuple[str, mx.array]]  # references, not copies
    adapter: _Adapter | None = None


@dataclass
class _AdapterFiles:
    """A validated adapter read from disk, not yet applied."""

    path: Path
    num_layers: int
    lora_parameters: dict[str, Any]  # mlx-lm's: rank, scale, dropout[, keys]
    alpha: float
    weights: dict[str, mx.array]


# What it takes to restore each model that had an adapter applied, keyed by
# id(model) and shared by every manager (the trainer looks here too); a
# finalizer drops the entry when the model dies.
_STATES: dict[int, _ModelState] = {}


def unfuse_adapter(model: nn.Module) -> Path | None:
    """Turn a fused adapter on ``model`` back into (trainable) LoRA layers.

    Training on top of fused weights would save an adapter that reproduces
    nothing: the base plus the saved update misses the fused one. Restoring the
    exact base weights and applying the same adapter unfused gives the trainer
    what it needs.

    Returns:
        Path | None: The adapter's path if it was fused, else ``None``.
    """
    state = _STATES.get(id(model))
    if state is None or state.adapter is None or not state.adapter.fused:
        return None
    training = model.training
    _restore(model, state.base_modules, state.base_params)
    _apply_adapter(model, state.adapter.files, fuse=False)
    model.train(training)
    state.adapter.fused = False
    return state.adapter.path


def flat_parameters(model: nn.Module) -> list[tuple[str, mx.array]]:
    """The model's parameters as (dotted name, array) pairs."""
    return cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))


def _module_paths(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if name}


def _restore(
    model: nn.Module, modules: dict[str, nn.Module], params: list[tuple[str, mx.array]]
) -> None:
    """Put back recorded module objects, then recorded parameter arrays."""
    current = _module_paths(model)
    changed = sorted(
        (path for path, module in modules.items() if current.get(path) is not module),
        key=lambda path: path.count("."),
    )
    # Restoring a module restores its whole subtree: skip paths below one.
    outermost: list[str] = []
    for path in changed:
        if not any(path.startswith(parent + ".") for parent in outermost):
            outermost.append(path)
    if outermost:
        model.update_modules(
            tree_unflatten([(path, modules[path]) for path in outermost])
        )
    model.update(tree_unflatten(params))


def read_json_object(path: Path, what: str, where: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RuntimeError(f"{what} {where} has no {path.name}") from None
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as e:
        raise RuntimeError(f"{what} {where}: {path.name} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise RuntimeError(
            f"{what} {where}: {path.name} must hold a JSON object, got {type(data).__name__}"
        )
    return data


def _read_adapter(path: Path, source: Path) -> _AdapterFiles:
    """Read and validate an adapter directory without touching any model.

    Every file is read from ``source``, the directory ``path`` resolves to, so a
    concurrent save of the alias cannot mix two checkpoints; messages name ``path``.
    """
    what = "LoRA adapter"
    if not source.exists():
        raise RuntimeError(f"{what} {path} does not exist")
    if not source.is_dir():
        raise RuntimeError(f"{what} {path} is not a directory")
    config = read_json_object(source / ADAPTER_CONFIG, what, path)
    where = f"{what} {path}: {ADAPTER_CONFIG}"

    fine_tune_type = config.get("fine_tune_type", "lora")
    if fine_tune_type != "lora":
        raise RuntimeError(
            f"{where}: unsupported fine_tune_type {fine_tune_type!r} (only 'lora' is supported)"
        )
    num_layers = config.get("num_layers")
    if (
        not isinstance(num_layers, int)
        or isinstance(num_layers, bool)
        or num_layers == 0
        or num_layers < -1
    ):
        raise RuntimeError(
            f"{where}: num_layers must be -1 (all) or an integer >= 1, got {num_layers!r}"
        )
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise RuntimeError(
            f"{where}: lora_parameters must be an object, got {params!r}"
        )

    def number(key: str, value: Any) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise RuntimeError(
                f"{where}: lora_parameters.{key} must be a finite number, got {value!r}"
            )
        return float(value)

    rank = params.get("rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise RuntimeError(
            f"{where}: lora_parameters.rank must be an integer >= 1, got {rank!r}"
        )
    # mlx-lm stores scale (= alpha / rank); alpha is an extra key it ignores.
    alpha_value = params.get("alpha", config.get("alpha"))
    if "scale" in params:
        scale = number("scale", params["scale"])
        alpha = scale * rank if alpha_value is None else number("alpha", alpha_value)
        if not math.isclose(alpha / rank, scale, rel_tol=1e-6, abs_tol=1e-12):
            raise RuntimeError(
                f"{where}: alpha {alpha:g} / rank {rank} disagrees with scale {scale:g}"
            )
    elif alpha_value is not None:
        alpha = number("alpha", alpha_value)
        scale = alpha / rank
    else:
        raise RuntimeError(f"{where}: lora_parameters needs 'scale' (or 'alpha')")
    dropout = number("dropout", params.get("dropout", 0.0))
    if not 0.0 <= dropout < 1.0:
        raise RuntimeError(
            f"{where}: lora_parameters.dropout must be in [0, 1), got {dropout:g}"
        )
    lora_parameters: dict[str, Any] = {"rank": rank, "scale": scale, "dropout": dropout}
    keys = params.get("keys")
    if keys is not None:
        if (
            not isinstance(keys, list)
            or not keys
            or not all(isinstance(k, str) and k for k in keys)
        ):
            raise RuntimeError(
                f"{where}: lora_parameters.keys must be a non-empty list of module names, got {keys!r}"
            )
        lora_parameters["keys"] = list(keys)

    weights_file = source / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise RuntimeError(f"{what} {path} has no {ADAPTER_WEIGHTS}")
    try:
        loaded = mx.load(str(weights_file))
        if not isinstance(loaded, dict):
            raise ValueError("not a safetensors file")
        mx.eval(loaded)
    except Exception as e:  # mlx reports corrupt files with several exception types
        raise RuntimeError(
            f"{what} {path}: {ADAPTER_WEIGHTS} is unreadable or corrupt ({e})"
        ) from e
    for name, value in loaded.items():
        if not mx.issubdtype(value.dtype, mx.floating):
            raise RuntimeError(
                f"{what} {path}: tensor {name} has dtype {value.dtype}, expected floating point"
            )
        if not mx.all(mx.isfinite(value)).item():
            raise RuntimeError(
                f"{what} {path}: tensor {name} contains NaN or infinite values"
            )
    return _AdapterFiles(path, num_layers, lora_parameters, alpha, loaded)


def _apply_adapter(model: nn.Module, files: _AdapterFiles, fuse: bool) -> list[str]:
    """Convert the model's layers to LoRA, load the weights and optionally fuse.

    Returns:
        list[str]: Paths of the converted modules.
    """
    where = f"LoRA adapter {files.path}"
    num_layers = files.num_layers
    if num_layers > len(model.layers):
        raise RuntimeError(
            f"{where}: num_layers {num_layers} exceeds the model's {len(model.layers)} blocks"
        )
    try:
        linear_to_lora_layers(model, num_layers, files.lora_parameters)
    except (ValueError, KeyError, TypeError) as e:
        raise RuntimeError(
            f"{where}: cannot convert the model's layers to LoRA ({e})"
        ) from e
    converted = [
        path
        for path, m in _module_paths(model).items()
        if isinstance(m, LORA_LAYER_TYPES)
    ]
    if not converted:
        keys = files.lora_parameters.get("keys")
        raise RuntimeError(f"{where}: keys {keys} match no layer of this model")

    expected = {
        name: value.shape
        for name, value in flat_parameters(model)
        if name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")
    }
    wrong_shape, unknown = [], []
    for name, value in sorted(files.weights.items()):
        if name not in expected:
            unknown.append(f"{name}: not a LoRA parameter of this model")
        elif tuple(value.shape) != tuple(expected[name]):
            wrong_shape.append(
                f"{name}: shape {tuple(value.shape)}, the model expects {tuple(expected[name])}"
            )
    missing = [
        f"{name}: missing from {ADAPTER_WEIGHTS}"
        for name in sorted(expected)
        if name not in files.weights
    ]
    errors = wrong_shape + unknown + missing
    if errors:
        shown = errors[:8] + (
            [f"... and {len(errors) - 8} more"] if len(errors) > 8 else []
        )
        raise RuntimeError(f"{where} does not fit this model:\n  " + "\n  ".join(shown))
    model.load_weights(list(files.weights.items()), strict=False)
    if fuse:
        # Folding an update into quantized weights re-quantizes them, which
        # changes them: layers over quantized weights keep the update unfused,
        # as mlx-lm applies an adapter to a quantized model (QLoRA).
        modules = _module_paths(model)
        fusable = [p for p in converted if not isinstance(getattr(modules[p], "linear", None), nn.QuantizedLinear)]
        if fusable:
            model.update_modules(tree_unflatten([(p, modules[p].fuse()) for p in fusable]))
    return converted


def _short_names(paths: list[str], keys: list[str] | None) -> list[str]:
    """Short module names (``q_proj``) of the converted paths, in the adapter's key order."""
    shorts = {path.rsplit(".", 1)[-1] for path in paths}
    if keys is None:
        return sorted(shorts)
    ordered = [key.rsplit(".", 1)[-1] for key in keys]
    return [
        name
        for i, name in enumerate(ordered)
        if name in shorts and name not in ordered[:i]
    ]



def load_adapter(model: nn.Module, adapter_path: str | os.PathLike[str], fuse: bool = True) -> None:
    """Apply a LoRA adapter in mlx-lm's format to ``model``.

    An adapter already on the model is removed first. If anything fails,
    the model is left exactly as it was (base, or the previous adapter).

    Args:
        model (nn.Module): An mlx-lm model (with ``.layers``).
        adapter_path (str | PathLike): Directory holding
            ``adapter_config.json`` and ``adapters.safetensors``.
        fuse (bool): Fold the low-rank update into the weights (fast
            inference); ``False`` keeps ``LoRALinear`` layers (trainable).
            Default: ``True``.

    Raises:
        RuntimeError: The adapter is missing, corrupt, unsupported or does
            not fit the model; the message names the path and the problem.
    """
    path = Path(adapter_path).expanduser().absolute()
    with reading(path) as source:
        files = _read_adapter(path, source)
    state = _state_for(model)
    before_modules = _module_paths(model)
    before_params = flat_parameters(model)
    training = model.training
    try:
        if state.adapter is not None:
            _restore(model, state.base_modules, state.base_params)
        converted = _apply_adapter(model, files, fuse)
        # New LoRA layers start in training mode; follow the model's mode.
        model.train(training)
        mx.eval(model.parameters())
    except BaseException as e:
        _restore(model, before_modules, before_params)
        model.train(training)
        if isinstance(e, RuntimeError) or not isinstance(e, Exception):
            raise
        raise RuntimeError(
            f"cannot load LoRA adapter {path}: {type(e).__name__}: {e}"
        ) from e
    state.adapter = _Adapter(
        path=path,
        source=source,
        files=files,
        rank=files.lora_parameters["rank"],
        alpha=files.alpha,
        target_modules=_short_names(converted, files.lora_parameters.get("keys")),
        fused=fuse,
    )

def unload_adapter(model: nn.Module) -> bool:
    """Remove the adapter from ``model``, restoring its exact base weights.

    Args:
        model (nn.Module): A model given to :func:`load_adapter` before.

    Returns:
        bool: ``True`` if an adapter was removed, ``False`` if none was loaded.
    """
    state = _STATES.get(id(model))
    if state is None or state.adapter is None:
        return False
    training = model.training
    _restore(model, state.base_modules, state.base_params)
    model.train(training)
    state.adapter = None
    return True

def adapter_info(model: nn.Module) -> dict[str, Any]:
    """Describe the adapter on ``model``.

    Returns:
        dict: ``loaded`` (bool), ``path`` (str, absolute), ``rank`` (int),
        ``alpha`` (float), ``target_modules`` (short names such as
        ``["q_proj", "v_proj"]``) and ``fused`` (bool). Without an adapter,
        ``loaded`` is ``False`` and the rest are ``None`` / empty.
    """
    state = _STATES.get(id(model))
    adapter = state.adapter if state is not None else None
    if adapter is None:
        return {
            "loaded": False,
            "path": None,
            "rank": None,
            "alpha": None,
            "target_modules": [],
            "fused": False,
        }
    return {
        "loaded": True,
        "path": str(adapter.path),
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "target_modules": list(adapter.target_modules),
        "fused": adapter.fused,
    }

def loaded_adapter(model: nn.Module) -> tuple[Path, dict[str, mx.array]] | None:
    """The adapter on ``model`` as read: the directory (what its checkpoint
    alias named at load time) and its weights; ``None`` without an adapter.

    Training continues from these weights rather than re-reading the
    directory, which another process's save may have superseded by then.
    """
    state = _STATES.get(id(model))
    if state is None or state.adapter is None:
        return None
    return state.adapter.source, state.adapter.files.weights

def _state_for(model: nn.Module) -> _ModelState:
    key = id(model)
    state = _STATES.get(key)
    if state is None:
        state = _ModelState(
            base_modules=_module_paths(model),
            base_params=flat_parameters(model),
        )
        _STATES[key] = state
        weakref.finalize(model, _STATES.pop, key, None)
    return state

def resolve_adapter_path(
    path_or_alias: str | os.PathLike[str], checkpoint_dir: str | os.PathLike[str]
) -> Path:
    """Turn an adapter alias or path into an absolute directory path.

    ``best``, ``final`` and ``latest`` name ``checkpoint_dir/<alias>``. A
    bare name (no path separator) that exists in ``checkpoint_dir`` names
    that checkpoint. Anything else is an explicit path (``~`` expanded,
    relative to the current directory) and may point anywhere.

    Args:
        path_or_alias (str | PathLike): An alias, a checkpoint name or a path.
        checkpoint_dir (str | PathLike): Where the trainer writes checkpoints.

    Returns:
        Path: The absolute adapter directory (an alias's may not exist yet).

    Raises:
        ValueError: A name resolved inside ``checkpoint_dir`` leads outside
            it (through a symbolic link).
        RuntimeError: A bare name that is neither an alias, a checkpoint
            nor an existing path.
    """
    text = os.fspath(path_or_alias)
    if not text:
        raise ValueError("adapter path must be a non-empty string")
    root = Path(checkpoint_dir).expanduser().resolve()
    is_bare = (
        not isinstance(path_or_alias, Path)
        and os.sep not in text
        and "/" not in text
    )
    is_bare = (
        is_bare and not text.startswith(("~", ".")) and text not in (".", "..")
    )
    if is_bare:
        candidate = root / text
        if text in ADAPTER_ALIASES or os.path.lexists(candidate):
            resolved = candidate.resolve()
            if resolved != root and root not in resolved.parents:
                raise ValueError(
                    f"adapter {text!r} resolves to {resolved}, outside checkpoint_dir {root}; "
                    f"give an explicit path to load an adapter from there"
                )
            # The alias itself, not what it names now: a save may replace it.
            return candidate
        explicit = Path(text).absolute()
        if explicit.exists():
            return explicit
        raise RuntimeError(
            f"adapter {text!r} not found: it is not an alias ({', '.join(ADAPTER_ALIASES)}), "
            f"not a checkpoint in {root}, and not an existing path"
        )
    return Path(os.path.normpath(Path(text).expanduser().absolute()))
