"""Atomic reading and writing of LoRA adapter checkpoints in mlx-lm's format.

A checkpoint is a directory that ``mlx_lm.load(model_dir, adapter_path=...)`` and
``mlx_lm.generate --adapter-path`` accept::

    <alias>/adapters.safetensors   LoRA parameters only (``lora_a``/``lora_b``)
    <alias>/adapter_config.json    fine_tune_type, num_layers, lora_parameters, ...
    <alias>/training_state.json    step, losses, timestamp, format version

Any number of threads and processes may save and load the aliases of one
directory at once. Each save writes a new, never-modified version directory and
publishes it by atomically replacing the alias, a relative symbolic link::

    <dir>/<alias>  ->  .versions/<alias>-<id>/     (os.replace of the link)
    <dir>/.versions/<alias>-<id>.writing           flock held by its live writer
    <dir>/.lock                                    shared: loaders; exclusive: cleanup

So an alias always names a complete checkpoint (the previous or the new one),
with no window in which it is missing, for readers of any tool. Loaders resolve
the link once and read every file from that one version while holding ``.lock``
shared; cleanup removes a version only when no alias names it, its writer's
lock is free (the writer finished or died: the kernel drops a dead process's
flock) and it holds ``.lock`` exclusively, so it never deletes what another
process is writing or reading.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

ADAPTER_WEIGHTS_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
TRAINING_STATE_FILE = "training_state.json"
CHECKPOINT_FORMAT_VERSION = 1

VERSIONS_DIR = ".versions"
LOCK_FILE = ".lock"
_WRITING = ".writing"
# Left by the previous layout (aliases as plain directories swapped by renames).
_OLD_PREFIX = ".old-"
_REPLACED = "-replaced-"
_LINK_PREFIX = ".link-"  # a new alias link before it replaces the alias
_POINTER_LOCK = ".active.lock"  # serialises changes of active/previous

ACTIVE_ALIAS = "active"
"""The adapter every system on this directory serves unless its config pins one."""
PREVIOUS_ALIAS = "previous"
"""What ``active`` named before its last change (for rolling back)."""

logger = logging.getLogger(__name__)


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
    # before the version is published.
    _fsync_path(path)


def _free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB free there"
    except OSError:
        return "free space unknown"


@contextlib.contextmanager
def _flock(path: Path, mode: int, *, create: bool) -> Iterator[bool]:
    """Hold ``flock(mode)`` on ``path``; yields False when it could not be taken.

    With ``LOCK_NB`` in ``mode`` a busy lock yields False instead of waiting. A
    lock file that cannot be opened (missing and ``create`` false, or a
    read-only directory) also yields False: there is then nothing to exclude.
    """
    while True:
        try:
            fd = os.open(path, (os.O_RDWR | os.O_CREAT) if create else os.O_RDONLY, 0o644)
        except OSError:
            yield False
            return
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        # Cleanup may have unlinked the file between open and flock; a lock on
        # an unlinked file excludes nobody, so take the one now on disk.
        try:
            current = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
        if not create:
            yield False
            return
    try:
        yield True
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def reading(path: str | Path) -> Iterator[Path]:
    """Pin the checkpoint at ``path`` while it is read.

    Resolves ``path`` (an alias link or a plain directory) once and holds its
    directory's ``.lock`` shared, so cleanup cannot remove the version being
    read and a concurrent save cannot mix two versions into one read.

    Args:
        path (str | Path): A checkpoint directory or alias.

    Yields:
        Path: The directory to read every file from.
    """
    path = Path(path)
    _recover_alias(path)
    with _flock(path.parent / LOCK_FILE, fcntl.LOCK_SH, create=False):
        yield path.resolve()


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


def _is_published_link(path: Path) -> bool:
    """Whether ``path`` is an alias link this module wrote."""
    return path.is_symlink() and Path(os.readlink(path)).parent == Path(VERSIONS_DIR)


def _publish(link: Path, path: Path) -> None:
    """Make the alias ``path`` be ``link`` (which already points at the new version)."""
    if path.is_dir() and not path.is_symlink():
        # A plain directory (the previous layout, or copied in by hand) cannot be
        # replaced atomically by a link: park it as an unpublished version under
        # the exclusive lock, so this package's loaders never see the gap, and
        # recovery puts it back if the process dies between the two renames.
        parked = path.parent / VERSIONS_DIR / f"{path.name}{_REPLACED}{uuid.uuid4().hex[:12]}"
        with _flock(path.parent / LOCK_FILE, fcntl.LOCK_EX, create=True):
            os.rename(path, parked)
            os.replace(link, path)
        return
    if os.path.lexists(path) and not _is_published_link(path):
        # A file, or a link somewhere else: replace the entry itself (a link's
        # target is never touched) and say so once.
        logger.warning("replacing %s, which was not a checkpoint of this directory", path)
    os.replace(link, path)


def save_adapter_checkpoint(
    model: nn.Module,
    path: str | Path,
    adapter_config: Mapping[str, Any],
    state: Mapping[str, Any],
) -> Path:
    """Atomically write an mlx-lm adapter checkpoint to ``path``.

    On success ``path`` names the new checkpoint; on failure it still names the
    previous one (if any). Other processes may read or write the same directory
    meanwhile.

    Args:
        model (nn.Module): The model; its trainable parameters are saved.
        path (str | Path): The alias (e.g. ``<checkpoint_dir>/best``). Its parent
            is created if needed.
        adapter_config (Mapping): The ``adapter_config.json`` contents
            (mlx-lm format: ``fine_tune_type``, ``num_layers``,
            ``lora_parameters``).
        state (Mapping): Training state (step, losses, ...). ``timestamp`` and
            ``version`` are added.

    Returns:
        Path: ``path``.

    Raises:
        RuntimeError: If the checkpoint cannot be written (disk full,
            permissions, ...); the message names the path and the cause.
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

    def write(version: Path) -> None:
        _write_weights(version / ADAPTER_WEIGHTS_FILE, weights)
        _write_json(version / ADAPTER_CONFIG_FILE, adapter_config)
        _write_json(version / TRAINING_STATE_FILE, full_state)

    _publish_new_version(path, write)
    return path


def _publish_new_version(path: Path, write: Callable[[Path], None]) -> None:
    """Write a new version with ``write(version_dir)`` and make alias ``path`` name it."""
    root = path.parent
    name = f"{path.name}-{uuid.uuid4().hex[:12]}"
    version = root / VERSIONS_DIR / name
    link = root / f"{_LINK_PREFIX}{name}"
    published = False
    try:
        version.parent.mkdir(parents=True, exist_ok=True)
        # Loaders lock this file; it must exist before anything is published.
        (root / LOCK_FILE).touch(exist_ok=True)
        writing = version.parent / f"{name}{_WRITING}"
        with _flock(writing, fcntl.LOCK_EX, create=True) as held:
            if not held:
                raise OSError(errno.EACCES, "cannot create the writer's lock file", str(writing))
            try:
                version.mkdir()
                write(version)
                _fsync_path(version, directory=True)
                os.symlink(os.path.join(VERSIONS_DIR, name), link)
                _publish(link, path)
                published = True
                _fsync_path(root, directory=True)
            except BaseException:
                if not published:
                    # Nothing names it: remove it now (recovery would, later).
                    with contextlib.suppress(OSError):
                        link.unlink()
                    shutil.rmtree(version, ignore_errors=True)
                raise
            finally:
                writing.unlink(missing_ok=True)
    except (OSError, RuntimeError) as e:
        # MLX reports a failed file write as RuntimeError without the path.
        cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC
        raise RuntimeError(
            f"Failed to write adapter checkpoint {path} (in {root}, "
            f"{_free_space(root)}): {cause}"
            + ("; the disk is full" if full else "")
            + ("" if published else "; the previous checkpoint there (if any) is unchanged")
        ) from e
    try:
        recover_checkpoint_dir(root)
    except RuntimeError as e:
        logger.warning("%s", e)


def _version_of(alias: Path) -> str | None:
    """The version an alias link of this directory names, or None."""
    return Path(os.readlink(alias)).name if _is_published_link(alias) else None


def _relink(alias: Path, version: str) -> None:
    """Atomically make ``alias`` name the existing version ``version``."""
    link = alias.parent / f"{_LINK_PREFIX}{alias.name}-{uuid.uuid4().hex[:12]}"
    os.symlink(os.path.join(VERSIONS_DIR, version), link)
    try:
        _publish(link, alias)
    except BaseException:
        link.unlink(missing_ok=True)
        raise


def set_active(checkpoint_dir: str | Path, source: str | Path) -> Path:
    """Make ``active`` name the checkpoint ``source`` names now; ``previous``
    then names what ``active`` named before.

    ``source`` is an alias of ``checkpoint_dir`` (``best``, ``previous``, ...)
    or any adapter directory, which is copied in as a new version. The two
    links change under an exclusive lock, so concurrent calls do not interleave;
    loaders never see either link missing.

    Args:
        checkpoint_dir (str | Path): The checkpoint directory.
        source (str | Path): An alias name or an adapter directory.

    Returns:
        Path: The version directory ``active`` now names.

    Raises:
        RuntimeError: ``source`` is not a readable adapter, or a link cannot be
            written; the message names it.
    """
    root = Path(checkpoint_dir).expanduser()
    src = root / source if isinstance(source, str) and os.sep not in source else Path(source)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _flock(root / _POINTER_LOCK, fcntl.LOCK_EX, create=True):
            version = _version_of(src) if src.parent == root else None
            if version is None:
                if not (src / ADAPTER_WEIGHTS_FILE).is_file():
                    raise RuntimeError(f"No adapter at {src}: it has no {ADAPTER_WEIGHTS_FILE}")
                imported = root / f"{ACTIVE_ALIAS}-import"
                with reading(src) as files:
                    _publish_new_version(imported, lambda v: _copy_adapter(files, v))
                version = _version_of(imported)
                assert version is not None
            current = _version_of(root / ACTIVE_ALIAS)
            if current is not None and current != version:
                _relink(root / PREVIOUS_ALIAS, current)
            _relink(root / ACTIVE_ALIAS, version)
            # Only now, with active naming it, may the import's own name go.
            (root / f"{ACTIVE_ALIAS}-import").unlink(missing_ok=True)
            _fsync_path(root, directory=True)
    except OSError as e:
        raise RuntimeError(f"Failed to make {src} the active adapter in {root}: {e}") from e
    return root / VERSIONS_DIR / version


def _copy_adapter(source: Path, version: Path) -> None:
    for name in (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE, TRAINING_STATE_FILE):
        if (source / name).is_file():
            shutil.copyfile(source / name, version / name)
            _fsync_path(version / name)


def list_checkpoints(checkpoint_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every alias of ``checkpoint_dir`` with the version it names and its state.

    Returns:
        dict: alias -> ``{"version", "path", "state"}`` (``state`` is the
        training state, or ``{"error": ...}`` when it cannot be read).
    """
    root = Path(checkpoint_dir).expanduser()
    found: dict[str, dict[str, Any]] = {}
    if not root.is_dir():
        return found
    for alias in sorted(root.iterdir(), key=lambda p: p.name):
        if alias.name.startswith(".") or not (alias.is_dir() or alias.is_symlink()):
            continue
        with reading(alias) as source:
            try:
                state: dict[str, Any] = read_training_state(source)
            except RuntimeError as e:
                state = {"error": str(e)}
            found[alias.name] = {"version": source.name, "path": str(source), "state": state}
    return found


def _writer_alive(versions: Path, name: str) -> bool:
    """Whether the process that writes version ``name`` still holds its lock."""
    with _flock(versions / f"{name}{_WRITING}", fcntl.LOCK_SH | fcntl.LOCK_NB, create=False) as free:
        return not free and (versions / f"{name}{_WRITING}").exists()


def recover_checkpoint_dir(checkpoint_dir: str | Path) -> list[str]:
    """Remove what dead or finished writers left behind in ``checkpoint_dir``.

    Removes versions that no alias names once their writer is gone, and stray
    lock and link files; puts back an alias whose plain directory a crash left
    parked. Safe to call at any time from any process: what a live writer
    holds, or a loader is reading, is never touched (while a loader reads,
    nothing is removed this time; the next save cleans up). A missing
    ``checkpoint_dir`` is not an error.

    Args:
        checkpoint_dir (str | Path): Directory holding the aliases.

    Returns:
        list[str]: One line per repair made (empty if nothing needed fixing).

    Raises:
        RuntimeError: If a repair fails; the message names the path.
    """
    root = Path(checkpoint_dir)
    versions = root / VERSIONS_DIR
    actions: list[str] = []
    if not root.is_dir():
        return actions
    try:
        parked = [e.name[len(_OLD_PREFIX) :] for e in root.glob(f"{_OLD_PREFIX}*")]
        if versions.is_dir():
            parked += [e.name.partition(_REPLACED)[0] for e in versions.glob(f"*{_REPLACED}*")]
        for alias in sorted(set(parked)):
            if _recover_alias(root / alias):
                actions.append(f"restored {root / alias}")
        if not versions.is_dir():
            return actions
        with _flock(root / LOCK_FILE, fcntl.LOCK_EX | fcntl.LOCK_NB, create=True) as held:
            if not held:
                return actions
            for entry in sorted(versions.iterdir()):
                name = entry.name.removesuffix(_WRITING)
                if _writer_alive(versions, name):
                    continue
                if entry.name.endswith(_WRITING):
                    if not (versions / name).exists():
                        entry.unlink(missing_ok=True)
                    continue
                # Checked after the writer's lock: a writer publishes before it
                # lets go, so an unpublished version of a gone writer is debris.
                if name not in _published(root):
                    shutil.rmtree(entry)
                    actions.append(f"removed unused {entry}")
                (versions / f"{name}{_WRITING}").unlink(missing_ok=True)
            for entry in root.glob(".link-*"):
                if not _writer_alive(versions, entry.name.removeprefix(_LINK_PREFIX)):
                    entry.unlink(missing_ok=True)
                    actions.append(f"removed stray {entry}")
        if actions:
            _fsync_path(root, directory=True)
    except OSError as e:
        raise RuntimeError(f"Failed to recover checkpoint directory {root}: {e}") from e
    return actions


def _published(root: Path) -> set[str]:
    """Names of the versions that alias links in ``root`` point at."""
    return {
        Path(os.readlink(entry)).name
        for entry in root.iterdir()
        if _is_published_link(entry) and not entry.name.startswith(_LINK_PREFIX)
    }


def _recover_alias(path: Path) -> bool:
    """Put back a checkpoint that a crash left parked while ``path`` is missing.

    The parked copy is ``.old-<name>`` (the previous layout's renames) or the
    newest ``.versions/<name>-replaced-*`` (a plain directory being replaced by
    a link). Only this alias is repaired: ``path`` may be any directory the
    caller names, and the rest of its parent is not this package's to change.
    """
    root, name = path.parent, path.name
    if os.path.lexists(path):
        return False
    old = root / f"{_OLD_PREFIX}{name}"
    parked = sorted(
        (root / VERSIONS_DIR).glob(f"{name}{_REPLACED}*"), key=lambda p: p.stat().st_mtime
    )
    if not (old.is_dir() and not old.is_symlink()) and not parked:
        return False
    try:
        # Exclusive, so a save parking this alias right now finishes first.
        with _flock(root / LOCK_FILE, fcntl.LOCK_EX, create=True):
            if os.path.lexists(path):
                return False
            if old.is_dir() and not old.is_symlink():
                os.rename(old, path)
            else:
                os.symlink(os.path.join(VERSIONS_DIR, parked[-1].name), path)
        _fsync_path(root, directory=True)
    except OSError as e:
        raise RuntimeError(f"Failed to restore {path} from {old if old.is_dir() else parked[-1]}: {e}") from e
    return True


def read_training_state(path: str | Path) -> dict[str, Any]:
    """The ``training_state.json`` of the checkpoint directory ``path``.

    Returns:
        dict: The state; empty for adapters written by other tools (e.g.
        ``mlx_lm.lora``), which have none.

    Raises:
        RuntimeError: The file is unreadable, not JSON or not a JSON object; the
            message names the file.
    """
    state_file = Path(path) / TRAINING_STATE_FILE
    if not state_file.is_file():
        return {}
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise RuntimeError(f"Failed to read training state {state_file}: {e}") from e
    if not isinstance(state, dict):
        raise RuntimeError(
            f"Training state {state_file} must hold a JSON object, got {type(state).__name__}"
        )
    return state


def load_adapter_checkpoint(
    path: str | Path,
) -> tuple[dict[str, mx.array], dict[str, Any], dict[str, Any]]:
    """Read an adapter checkpoint: every file from one complete version.

    Args:
        path (str | Path): The checkpoint directory or alias.

    Returns:
        tuple: ``(weights, adapter_config, training_state)``; the state is an
        empty dict for adapters written by other tools (e.g. ``mlx_lm.lora``).

    Raises:
        RuntimeError: If the directory, its weights or its config are missing
            or unreadable; the message names the path.
    """
    with reading(path) as source:
        weights_file = source / ADAPTER_WEIGHTS_FILE
        config_file = source / ADAPTER_CONFIG_FILE
        if not weights_file.is_file():
            raise RuntimeError(f"No adapter weights at {Path(path) / ADAPTER_WEIGHTS_FILE}")
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
        state = read_training_state(source)
    return weights, config, state
