"""Atomic reading and writing of LoRA adapter checkpoints in mlx-lm's format.

A checkpoint is a directory that ``mlx_lm.load(model_dir, adapter_path=...)`` and
``mlx_lm.generate --adapter-path`` accept::

    <alias>/adapters.safetensors   LoRA parameters only (``lora_a``/``lora_b``)
    <alias>/adapter_config.json    fine_tune_type, num_layers, lora_parameters, ...
    <alias>/training_state.json    step, losses, timestamp, format version

Writes are atomic per alias: everything is written and fsynced into a temporary
directory beside the target (same filesystem), then swapped in with renames::

    <alias>  ->  .old-<alias>      (old copy parked)
    .tmp-<alias>-<id>  ->  <alias> (new copy in place)
    remove .old-<alias>

A crash at any instant therefore leaves either the complete old or the complete
new checkpoint; :func:`recover_checkpoint_dir` (run by the loaders here) puts a
parked old copy back when the alias is missing and removes leftovers. A
checkpoint directory is assumed to have one writer at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

ADAPTER_WEIGHTS_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
TRAINING_STATE_FILE = "training_state.json"
CHECKPOINT_FORMAT_VERSION = 1

_OLD_PREFIX = ".old-"
_TMP_PREFIX = ".tmp-"


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY
    if directory and hasattr(os, "O_DIRECTORY"):
        flags |= os.O_DIRECTORY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_weights(path: Path, weights: dict[str, mx.array]) -> None:
    mx.save_safetensors(str(path), weights)
    # MLX writes the file itself; fsync it afterwards so the data is durable
    # before the directory is renamed into place.
    _fsync_path(path)


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The parameters an adapter file holds: the model's trainable ones.

    Names are those mlx-lm saves, ``tree_flatten(model.trainable_parameters())``
    (e.g. ``model.layers.0.self_attn.q_proj.lora_a``).

    Args:
        model (nn.Module): A model whose base weights are frozen and whose LoRA
            parameters are trainable.

    Returns:
        dict[str, mx.array]: Flat name -> array mapping.
    """
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapter_checkpoint(
    model: nn.Module,
    path: str | Path,
    adapter_config: Mapping[str, Any],
    state: Mapping[str, Any],
) -> Path:
    """Atomically write an mlx-lm adapter checkpoint to ``path``.

    On success ``path`` holds the new checkpoint; on failure it still holds the
    previous one (if any) and no temporary files are left behind.

    Args:
        model (nn.Module): The model; its trainable parameters are saved.
        path (str | Path): The checkpoint directory (e.g.
            ``<checkpoint_dir>/best``). Its parent is created if needed.
        adapter_config (Mapping): The ``adapter_config.json`` contents
            (mlx-lm format: ``fine_tune_type``, ``num_layers``,
            ``lora_parameters``).
        state (Mapping): Training state (step, losses, ...). ``timestamp`` and
            ``version`` are added.

    Returns:
        Path: ``path``.

    Raises:
        RuntimeError: If the checkpoint cannot be written (disk full,
            permissions, ...); the message names the path.
    """
    path = Path(path)
    weights = adapter_weights(model)
    if not weights:
        raise RuntimeError(
            f"Cannot save adapter checkpoint to {path}: the model has no trainable "
            "parameters"
        )
    mx.eval(weights)
    full_state = {
        **dict(state),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "version": CHECKPOINT_FORMAT_VERSION,
    }
    parent = path.parent
    old = parent / f"{_OLD_PREFIX}{path.name}"
    tmp = parent / f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:12]}"
    parked = False
    try:
        parent.mkdir(parents=True, exist_ok=True)
        # A parked copy beside a present alias is a leftover of an interrupted
        # swap whose new copy made it in; it is no longer needed.
        if old.exists() and path.exists():
            shutil.rmtree(old)
        elif old.exists():
            os.rename(old, path)
        tmp.mkdir()
        _write_weights(tmp / ADAPTER_WEIGHTS_FILE, weights)
        _write_json(tmp / ADAPTER_CONFIG_FILE, adapter_config)
        _write_json(tmp / TRAINING_STATE_FILE, full_state)
        _fsync_path(tmp, directory=True)

        if path.exists():
            os.rename(path, old)
            parked = True
        os.rename(tmp, path)
    except BaseException as e:
        # Put the previous checkpoint back before reporting.
        try:
            if parked and not path.exists() and old.exists():
                os.rename(old, path)
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise RuntimeError(
                f"Failed to write adapter checkpoint {path}: {e}; the previous "
                "checkpoint there (if any) is unchanged"
            ) from e
        raise
    if parked:
        shutil.rmtree(old, ignore_errors=True)
    try:
        _fsync_path(parent, directory=True)
    except OSError as e:
        raise RuntimeError(
            f"Wrote adapter checkpoint {path} but could not sync its directory: {e}"
        ) from e
    return path


def recover_checkpoint_dir(checkpoint_dir: str | Path) -> list[str]:
    """Repair what an interrupted :func:`save_adapter_checkpoint` left behind.

    For every alias: if ``<alias>/`` is missing but ``.old-<alias>/`` exists, the
    old copy is moved back; if both exist the old copy is removed. Temporary
    ``.tmp-*`` directories are removed. Safe to call at any time when no save is
    in progress; a missing ``checkpoint_dir`` is not an error.

    Args:
        checkpoint_dir (str | Path): Directory holding the alias directories.

    Returns:
        list[str]: One line per repair made (empty if nothing needed fixing).

    Raises:
        RuntimeError: If a repair fails; the message names the path.
    """
    root = Path(checkpoint_dir)
    actions: list[str] = []
    if not root.is_dir():
        return actions
    try:
        for entry in sorted(root.iterdir()):
            if not entry.is_dir():
                continue
            if entry.name.startswith(_OLD_PREFIX):
                alias = root / entry.name[len(_OLD_PREFIX) :]
                if alias.exists():
                    shutil.rmtree(entry)
                    actions.append(f"removed superseded {entry}")
                else:
                    os.rename(entry, alias)
                    actions.append(f"restored {alias} from {entry}")
            elif entry.name.startswith(_TMP_PREFIX):
                shutil.rmtree(entry)
                actions.append(f"removed incomplete {entry}")
        if actions:
            _fsync_path(root, directory=True)
    except OSError as e:
        raise RuntimeError(f"Failed to recover checkpoint directory {root}: {e}") from e
    return actions


def _recover_alias(path: Path) -> None:
    """Put back this checkpoint's parked copy if a swap of it was interrupted.

    Only this alias is repaired: ``path`` may be any directory the caller names,
    and the rest of its parent is not this package's to change.
    """
    old = path.parent / f"{_OLD_PREFIX}{path.name}"
    if path.exists() or not old.is_dir():
        return
    try:
        os.rename(old, path)
        _fsync_path(path.parent, directory=True)
    except OSError as e:
        raise RuntimeError(f"Failed to restore {path} from {old}: {e}") from e


def load_adapter_checkpoint(
    path: str | Path,
) -> tuple[dict[str, mx.array], dict[str, Any], dict[str, Any]]:
    """Read an adapter checkpoint, recovering an interrupted save first.

    Args:
        path (str | Path): The checkpoint directory.

    Returns:
        tuple: ``(weights, adapter_config, training_state)``; the state is an
        empty dict for adapters written by other tools (e.g. ``mlx_lm.lora``).

    Raises:
        RuntimeError: If the directory, its weights or its config are missing
            or unreadable; the message names the path.
    """
    path = Path(path)
    _recover_alias(path)
    weights_file = path / ADAPTER_WEIGHTS_FILE
    config_file = path / ADAPTER_CONFIG_FILE
    if not weights_file.is_file():
        raise RuntimeError(f"No adapter weights at {weights_file}")
    try:
        weights = mx.load(str(weights_file))
        if not isinstance(weights, dict):
            raise RuntimeError(f"{weights_file} holds no named arrays")
        mx.eval(weights)
    except (OSError, ValueError, RuntimeError) as e:
        raise RuntimeError(f"Failed to read adapter weights {weights_file}: {e}") from e
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RuntimeError(f"Failed to read adapter config {config_file}: {e}") from e
    state_file = path / TRAINING_STATE_FILE
    state: dict[str, Any] = {}
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RuntimeError(
                f"Failed to read training state {state_file}: {e}"
            ) from e
    return weights, config, state
