"""One learning step: train a copy of the serving draft, judge it, promote it.

The serving draft is never trained in place. A copy (base draft plus the serving
adapter's weights) trains on the collected failures and a replay sample; the
candidate is then judged against the serving adapter on held-out failures and
held-out replay examples by the share of target tokens the draft predicts
exactly (greedy speculation's per-token acceptance). Only a candidate at least
as good is promoted: ``active`` under ``training.checkpoint_dir`` is pointed at
it (``previous`` keeps the one before), and every system on that directory
serves it from its next generation. Either way the failures move to the replay
buffer, so a run is not repeated on the same data.

A run can happen in the caller's process or, with :class:`BackgroundTraining`,
in a child process while the caller keeps generating. One run at a time per
``checkpoint_dir``, across processes (a lock file held by the running trainer).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import multiprocessing
import os
import time
import traceback
from collections.abc import Iterator, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from speclora.checkpoint import set_active
from speclora.config import Config
from speclora.data_collector import DataCollector, pair_fingerprint
from speclora.models import ModelManager

logger = logging.getLogger(__name__)

TRAINING_LOCK = ".training.lock"


def open_collector(config: Config, manager: ModelManager) -> DataCollector:
    """The failure store of ``config``, keeping the records of this model pair."""
    c = config.collection
    return DataCollector(
        c.data_dir,
        replay_buffer_max_size=c.replay_buffer_max_size,
        acceptance_threshold=c.acceptance_threshold,
        # Examples are kept per tokenizer: another pair's token ids are meaningless here.
        pair=pair_fingerprint(manager.tokenizer.get_vocab()),
    )


@contextlib.contextmanager
def _one_run_at_a_time(checkpoint_dir: Path, *, wait: bool) -> Iterator[None]:
    """Hold ``checkpoint_dir``'s training lock (the kernel drops it if we die)."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(checkpoint_dir / TRAINING_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise RuntimeError(
                    f"another training run is in progress on {checkpoint_dir}; "
                    "one runs at a time"
                ) from None
            logger.info("waiting for another training run on %s to finish", checkpoint_dir)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def judge(results: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether a trained candidate may replace the serving adapter, and why.

    Both are scored on the same held-out tokens: the share the draft predicts
    exactly (``m``, the per-token acceptance of greedy speculation) and the
    training loss. Held-out sets are small, so ``m`` is noisy; its noise is
    taken as two binomial standard errors over the held-out tokens. The
    candidate is promoted when it predicts clearly more tokens, or when its
    loss is not higher and it predicts no fewer tokens beyond that noise.

    Args:
        results (Mapping): What :meth:`LoRATrainer.train` returned.

    Returns:
        tuple[bool, str]: The decision and a sentence saying why.
    """
    before, after = results["initial_eval_match"], results["best_eval_match"]
    if before is None or after is None or math.isnan(before) or math.isnan(after):
        return True, "promoted without a held-out comparison (nothing was held out)"
    n = max(int(results["eval_tokens"]), 1)
    noise = 2.0 * math.sqrt(max(before * (1.0 - before), 1.0 / n) / n)
    loss_before, loss_after = results["initial_eval_loss"], results["best_loss"]
    figures = (
        f"held-out token match {after:.4f} vs {before:.4f} serving (noise {noise:.4f} over "
        f"{n} tokens), loss {loss_after:.4f} vs {loss_before:.4f}"
    )
    if after >= before + noise or (after >= before - noise and loss_after <= loss_before):
        return True, f"promoted: {figures}"
    return False, f"not promoted, kept as candidate 'best': {figures}"


def train_and_promote(
    config: Config,
    manager: ModelManager,
    collector: DataCollector,
    serving: Mapping[str, mx.array] | None,
    *,
    num_epochs: int | None = None,
    learning_rate: float | None = None,
    wait: bool = True,
) -> dict[str, Any]:
    """Train a copy of the draft on the collected failures; promote it if not worse.

    Args:
        config (Config): The system's configuration.
        manager (ModelManager): Holds the base draft and the tokenizer.
        collector (DataCollector): The failures and the replay buffer.
        serving (Mapping, optional): The serving adapter's weights (training
            continues from them), ``None`` for the base draft.
        num_epochs (int, optional): Overrides ``training.num_epochs``.
        learning_rate (float, optional): Overrides ``training.learning_rate``.
        wait (bool): When another run (in any process) holds ``checkpoint_dir``,
            wait for it to end; ``False`` raises instead. Default: ``True``.

    Returns:
        dict: The trainer's results plus ``promoted`` (bool), ``promotion``
        (why), ``active_path`` (the version ``active`` names, when promoted)
        and ``failures_consumed``.

    Raises:
        ValueError: Fewer failures than ``training.min_examples``, or bad overrides.
        RuntimeError: Training failed, or (with ``wait=False``) another run
            holds ``checkpoint_dir``; nothing is promoted and no failure is consumed.
    """
    from speclora.training import LoRATrainer, check_overrides

    check_overrides(num_epochs, learning_rate)
    root = Path(config.training.checkpoint_dir).expanduser()
    with _one_run_at_a_time(root, wait=wait):
        failures = collector.load_failures()
        need = config.training.min_examples
        if len(failures) < need:
            raise ValueError(
                f"not enough training data: {len(failures)} failures collected, "
                f"training.min_examples is {need}"
            )
        trainer = LoRATrainer(
            manager.training_copy_of_draft(),
            manager.tokenizer,
            config.training,
            show_progress=config.logging.show_progress,
        )
        results = trainer.train(
            failures,
            collector.load_replay_buffer(),
            num_epochs=num_epochs,
            learning_rate=learning_rate,
            resume_from=serving,
        )
        promoted, why = judge(results)
        results.update(promoted=promoted, promotion=why)
        if promoted:
            results["active_path"] = str(set_active(root, "best"))
        logger.info("training run: %s", why)
        results["failures_consumed"] = collector.consume_failures(f.id for f in failures)
    return results


def _child(
    config: dict[str, Any],
    serving: dict[str, np.ndarray] | None,
    num_epochs: int | None,
    learning_rate: float | None,
    conn: Connection,
) -> None:
    """Body of the background process: load the pair, run, send the outcome."""
    import speclora  # noqa: F401  (preloads OpenBLAS before the first MLX op)

    try:
        cfg = Config.from_dict(config)
        manager = ModelManager(cfg)
        manager.load_models()
        collector = open_collector(cfg, manager)
        weights = None if serving is None else {k: mx.array(v) for k, v in serving.items()}
        # A background run gives way to one already running rather than queueing.
        result = train_and_promote(
            cfg, manager, collector, weights, num_epochs=num_epochs, learning_rate=learning_rate,
            wait=False,
        )
        conn.send(("ok", {k: v for k, v in result.items() if k not in ("losses", "eval_losses")}))
    except BaseException as e:  # reported to the parent, which keeps serving
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"))
    finally:
        conn.close()


class BackgroundTraining:
    """A :func:`train_and_promote` run in a child process.

    The child loads its own copy of the pair, so the caller's models are never
    touched while it trains; a promotion reaches the caller through ``active``.

    Args:
        config (Config): The system's configuration.
        serving (Mapping, optional): The serving adapter's weights.
        num_epochs (int, optional): Overrides ``training.num_epochs``.
        learning_rate (float, optional): Overrides ``training.learning_rate``.
    """

    def __init__(
        self,
        config: Config,
        serving: Mapping[str, mx.array] | None,
        *,
        num_epochs: int | None = None,
        learning_rate: float | None = None,
    ) -> None:
        # spawn, not fork: a forked MLX process inherits threads in unknown states.
        ctx = multiprocessing.get_context("spawn")
        receive, send = ctx.Pipe(duplex=False)
        weights = None if serving is None else {k: np.array(v) for k, v in serving.items()}
        self._conn = receive
        self._process = ctx.Process(
            target=_child,
            args=(config.to_dict(), weights, num_epochs, learning_rate, send),
            name="speclora-training",
        )
        self.started = time.time()
        self._process.start()
        send.close()
        self._outcome: tuple[str, Any] | None = None

    @property
    def running(self) -> bool:
        return self.poll() is None

    def poll(self, timeout: float = 0.0) -> tuple[str, Any] | None:
        """``("ok", results)`` or ``("error", message)`` once finished, else ``None``."""
        if self._outcome is None and self._conn.poll(timeout):
            try:
                self._outcome = self._conn.recv()
            except EOFError:  # the child died without a word (e.g. killed)
                self._process.join()
                self._outcome = ("error", f"training process exited with code {self._process.exitcode}")
            self._process.join()
        return self._outcome

    def wait(self, timeout: float | None = None) -> tuple[str, Any] | None:
        """Block until the run ends (or ``timeout`` seconds pass)."""
        return self.poll(timeout=timeout if timeout is not None else 1e9)


__all__ = ["BackgroundTraining", "judge", "open_collector", "train_and_promote"]
