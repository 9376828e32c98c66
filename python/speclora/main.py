"""SpeculativeDecodingSystem: models, decoders, collection and training in one place.

The online-learning loop: detailed generations record where the draft and the target
disagree; those whose acceptance falls below the threshold are stored as failures;
``train()`` fits a LoRA adapter on a copy of the draft (plus a replay buffer),
promotes it when it is not worse than the serving one (see :mod:`speclora.learning`),
hot-swaps it into the draft between generations, and hands the failures over to the
replay buffer.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from speclora.checkpoint import ACTIVE_ALIAS
from speclora.config import ADAPTER_ALIASES, BASE_DRAFT, Config
from speclora.learning import BackgroundTraining, train_and_promote
from speclora.training import check_overrides
from speclora.data_collector import DataCollector, TrainingExample, pair_fingerprint
from speclora.models import ModelManager
from speclora.results import GenerationResult, StreamChunk
from speclora.speculative_manual import ManualSpeculativeDecoder
from speclora.tracker import AcceptanceTracker

logger = logging.getLogger("speclora")

MODES = ("fast", "detailed")


class SpeculativeDecodingSystem:
    """Speculative decoding whose draft model learns from its own rejections.

    Args:
        config (Mapping): The parsed ``config.yaml`` (see ``configs/config.yaml``);
          validated here, ``ValueError`` naming the bad key otherwise.

    One system serves one request at a time: a call made while another is running
    (from another thread) raises ``RuntimeError`` rather than interleaving two
    generations on the same KV caches and models.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = Config.from_dict(config)
        self.manager: ModelManager | None = None
        self._decoder: ManualSpeculativeDecoder | None = None
        self.collector: DataCollector | None = None
        self.tracker = AcceptanceTracker(self.config.collection.tracker_window)
        self.generation_count = 0
        self.last_result: GenerationResult | None = None
        self._adapter_path: Path | None = None
        # Serve what checkpoint_dir's "active" names unless an adapter is pinned
        # (by models.draft_adapter, or by load_adapter / unload_adapter).
        self._follow_active_adapter = self.config.models.draft_adapter is None
        self._training: BackgroundTraining | None = None
        self._training_stats: dict[str, Any] = {
            "running": False,
            "runs": 0,
            "promotions": 0,
            "last": None,
            "last_error": None,
        }
        self._tokens = 0
        self._decode_seconds = 0.0
        self._accepted_length_sum = 0.0
        self._busy = threading.Lock()
        logging.getLogger("speclora").setLevel(self.config.logging.level)

    # -- lifecycle -----------------------------------------------------------------

    def initialize(self) -> None:
        """Load the models and tokenizer, build the decoders, open the collector and
        load the configured adapter when it exists.

        Raises:
            RuntimeError: a model or adapter could not be loaded (the cause is chained).
            ValueError: the models cannot speculate together (e.g. vocabularies differ).
        """
        with self._exclusive("initialize"):
            if self.config.generation.memory_limit_gb is not None:
                import mlx.core as mx

                mx.set_memory_limit(int(self.config.generation.memory_limit_gb * 2**30))
            manager = ModelManager(self.config)
            target, draft = manager.load_models()
            g = self.config.generation
            # One decoder for both modes: detailed generations ask it to record.
            self._decoder = ManualSpeculativeDecoder(
                target,
                draft,
                manager.tokenizer,
                g.num_draft_tokens,
                g.temperature,
                top_p=g.top_p,
                top_k=g.top_k,
                min_p=g.min_p,
                adaptive_draft=g.adaptive_draft,
                max_draft_tokens=g.max_draft_tokens,
                ngram_proposer=g.ngram_proposer,
                use_chat_template=g.use_chat_template,
                stop_tokens=self._stop_token_ids(manager.tokenizer, g.stop_tokens),
                max_kv_size=g.max_kv_size,
                top_k_logprobs=self.config.collection.top_k_logprobs,
            )
            c = self.config.collection
            # Examples are kept per tokenizer: another pair's token ids are meaningless here.
            self.collector = DataCollector(
                c.data_dir,
                replay_buffer_max_size=c.replay_buffer_max_size,
                acceptance_threshold=c.acceptance_threshold,
                pair=pair_fingerprint(manager.tokenizer.get_vocab()),
            )
            self.manager = manager
            pinned = self.config.models.draft_adapter
            if pinned not in (None, BASE_DRAFT) and not self._load_adapter(pinned):
                logger.info("configured adapter %s does not exist yet", pinned)
            self._follow_active()

    @staticmethod
    def _stop_token_ids(tokenizer: Any, stop_tokens: Sequence[str]) -> list[int]:
        ids = []
        for text in stop_tokens:
            encoded = tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(
                    f"generation.stop_tokens entry {text!r} is not a single token "
                    f"(it encodes to {encoded})"
                )
            ids.append(encoded[0])
        return ids

    @property
    def decoder(self) -> ManualSpeculativeDecoder:
        """The system's decoder: records disagreements unless called with
        ``record=False`` (fast mode)."""
        self._require_initialized()
        assert self._decoder is not None
        return self._decoder

    def _require_initialized(self) -> None:
        if self.manager is None:
            raise RuntimeError("SpeculativeDecodingSystem.initialize() must be called first")

    @contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                f"SpeculativeDecodingSystem.{what}() called while another call is running; "
                "one system serves one request at a time (use one system per thread)"
            )
        try:
            yield
        finally:
            self._busy.release()

    # -- generation ----------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        mode: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> str:
        """Generate a reply to ``prompt``.

        Args:
            prompt (str): The user prompt (chat template applied when configured).
            mode (str, optional): ``"fast"``, or ``"detailed"`` to record
              disagreements and collect the generation when its acceptance is
              below the threshold. Default: ``generation.mode``.
            max_tokens (int, optional): Overrides ``generation.max_tokens``.
            temperature (float, optional): Overrides ``generation.temperature``.

        Returns:
            str: The generated text. The full result is kept in ``last_result``.

        Raises:
            ValueError: bad arguments. MemoryError: the request cannot fit the
            context window or the configured memory limit. RuntimeError: generation failed.
        """
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        return self.generate_result(prompt, mode=mode, max_tokens=max_tokens, temperature=temperature).text

    def generate_result(
        self,
        prompt: str | Sequence[int],
        *,
        mode: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> GenerationResult:
        """Like :meth:`generate`, returning the full :class:`GenerationResult`.

        ``top_p`` and ``seed`` override ``generation.top_p`` / ``generation.seed``
        for this call.
        """
        for chunk in self.generate_stream(
            prompt, mode=mode, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed
        ):
            if chunk.result is not None:
                return chunk.result
        raise AssertionError("generate_stream ended without a result")

    def generate_stream(
        self,
        prompt: str | Sequence[int],
        *,
        mode: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Iterator[StreamChunk]:
        """:meth:`generate_result`, streamed: one chunk per round, then the result.

        ``prompt`` may also be token ids, used as they are (no chat template:
        e.g. a whole conversation the caller templated). The arguments are
        checked and the system is claimed when iteration starts; closing the
        iterator early stops the generation, releases the system and collects
        nothing.

        Yields:
            StreamChunk: the tokens each round decided, then (last) the result.
        """
        self._require_initialized()
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, (str, Sequence)):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__} (or a list of token ids)")
        mode = self.config.generation.mode if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        g = self.config.generation
        max_tokens = g.max_tokens if max_tokens is None else max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if temperature is not None and (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature)
            or temperature < 0
        ):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_p is not None and (
            isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1
        ):
            raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64
        ):
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        decoder = self.decoder
        assert self.manager is not None
        if isinstance(prompt, str):
            self.manager.check_prompt_length(prompt)
        prompt_tokens = decoder.encode_prompt(prompt)
        text = prompt if isinstance(prompt, str) else decoder.tokenizer.decode(prompt_tokens)
        self.manager.check_fits(len(prompt_tokens), max_tokens, g.memory_limit_gb)
        with self._exclusive("generate"):
            # Between generations, never inside one: a finished background run
            # and a newly promoted adapter take effect here.
            self._poll_training()
            self._follow_active()
            rounds = decoder.stream(
                prompt_tokens,
                max_tokens,
                temperature=temperature,
                seed=g.seed if seed is None else seed,
                top_p=top_p,
                record=mode == "detailed",
            )
            try:
                while True:
                    try:
                        r = next(rounds)
                    except StopIteration as done:
                        result: GenerationResult = done.value
                        break
                    if r.tokens:
                        yield StreamChunk(list(r.tokens), drafted=r.drafted, accepted=r.accepted)
            except (ValueError, MemoryError):
                raise
            except Exception as e:
                raise RuntimeError(f"generation failed: {e}") from e
            finally:
                rounds.close()
            self._account(result)
            if mode == "detailed":
                self._collect(text, result)
                self._maybe_train_automatically()
        yield StreamChunk([], result)

    def _account(self, result: GenerationResult) -> None:
        self.generation_count += 1
        self.last_result = result
        if result.num_draft_tokens:
            self.tracker.add(result.acceptance_rate)
        self._tokens += len(result.tokens)
        self._decode_seconds += result.decode_s
        self._accepted_length_sum += result.mean_accepted_length

    def _collect(self, prompt: str, result: GenerationResult) -> None:
        assert self.collector is not None
        if not result.num_draft_tokens or not self.collector.is_failure(result.acceptance_rate):
            return
        now = datetime.now(timezone.utc)
        self.collector.add_failure(
            TrainingExample(
                id=f"{now.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}",
                prompt=prompt,
                target_output=result.text,
                acceptance_rate=result.acceptance_rate,
                prompt_tokens=result.prompt_tokens,
                disagreements=result.disagreements,
                timestamp=now.isoformat(),
                output_tokens=result.tokens,
            )
        )

    def batch_generate(
        self,
        prompts: Sequence[str],
        mode: str | None = None,
        show_progress: bool | None = None,
    ) -> list[str]:
        """Generate a reply for each prompt, in order.

        Args:
            prompts (Sequence[str]): The prompts.
            mode (str, optional): ``"fast"`` or ``"detailed"``.
              Default: ``generation.mode``.
            show_progress (bool, optional): Show a tqdm progress bar.
              Default: ``logging.show_progress``.

        Returns:
            list[str]: One reply per prompt.
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ValueError("prompts must be a list of strings")
        from tqdm.auto import tqdm

        if show_progress is None:
            show_progress = self.config.logging.show_progress
        mode = self.config.generation.mode if mode is None else mode
        bar = tqdm(prompts, desc=f"generate ({mode})", unit="prompt", disable=not show_progress)
        return [self.generate(p, mode=mode) for p in bar]

    # -- training ------------------------------------------------------------------

    def train(
        self,
        num_epochs: int | None = None,
        learning_rate: float | None = None,
        *,
        background: bool = False,
    ) -> dict[str, Any]:
        """Train a LoRA adapter on the collected failures; serve it if it is not worse.

        A copy of the draft (with the serving adapter) trains; the result is judged
        against the serving adapter on held-out data and, when at least as good,
        promoted: ``active`` under ``training.checkpoint_dir`` names it and this
        system (and every system following ``active``) serves it. Either way the
        failures move to the replay buffer.

        Args:
            num_epochs (int, optional): Overrides ``training.num_epochs``.
            learning_rate (float, optional): Overrides ``training.learning_rate``.
            background (bool): Train in a child process and return at once;
              generation goes on meanwhile and a promoted adapter is swapped in
              between generations. ``get_stats()["training"]`` and
              :meth:`wait_for_training` report the outcome. Default: ``False``.

        Returns:
            dict: ``final_loss``, ``best_loss``, ``global_step``, ``checkpoint_path``,
            ``promoted`` (bool), ``promotion`` (why) and the trainer's other
            figures; with ``background=True``, ``{"started": True}``.

        Raises:
            ValueError: fewer failures than ``training.min_examples``, or bad overrides.
            RuntimeError: training failed or another run is in progress (the
              serving adapter stays in use).
        """
        self._require_initialized()
        assert self.manager is not None and self.collector is not None
        check_overrides(num_epochs, learning_rate)
        with self._exclusive("train"):
            if background:
                self._start_training(num_epochs, learning_rate)
                return {"started": True}
            before = self._active_version()
            try:
                results = train_and_promote(
                    self.config,
                    self.manager,
                    self.collector,
                    self._serving_weights(),
                    num_epochs=num_epochs,
                    learning_rate=learning_rate,
                )
            except (ValueError, RuntimeError) as e:
                self._training_stats["last_error"] = str(e)
                raise
            except Exception as e:
                self._training_stats["last_error"] = str(e)
                raise RuntimeError(f"training failed: {e}") from e
            finally:
                # A promotion stands even if a later step (handing the failures
                # over) failed: serve it.
                if self._active_version() != before:
                    self._follow_active_adapter = True
                self._follow_active()
            self._record_training(results)
        return results

    def wait_for_training(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Wait for the background training run, if one is running.

        Returns:
            dict: ``get_stats()["training"]`` after the run ended (or after
            ``timeout`` seconds), ``None`` when no run was started.
        """
        if self._training is None and not self._training_stats["runs"]:
            return None
        if self._training is not None:
            self._training.wait(timeout)
            self._poll_training()
        return dict(self._training_stats)

    def _serving_weights(self) -> Mapping[str, Any] | None:
        assert self.manager is not None
        loaded = self.manager.loaded_adapter(self.decoder.draft_model)
        return loaded[1] if loaded else None

    def _start_training(self, num_epochs: int | None, learning_rate: float | None) -> None:
        assert self.collector is not None
        self._poll_training()
        if self._training is not None:
            raise RuntimeError("a background training run of this system is already in progress")
        have, need = self.collector.failure_count, self.config.training.min_examples
        if have < need:
            raise ValueError(
                f"not enough training data: {have} failures collected, training.min_examples is {need}"
            )
        self._training = BackgroundTraining(
            self.config, self._serving_weights(), num_epochs=num_epochs, learning_rate=learning_rate
        )
        self._training_stats.update(running=True)

    def _maybe_train_automatically(self) -> None:
        """With ``training.auto``, start a background run once enough failures wait."""
        assert self.collector is not None
        if (
            self.config.training.auto
            and self._training is None
            and self.collector.failure_count >= self.config.training.min_examples
        ):
            try:
                self._start_training(None, None)
            except (ValueError, RuntimeError) as e:
                logger.warning("automatic training not started: %s", e)

    def _poll_training(self) -> None:
        """Record the outcome of a finished background run."""
        if self._training is None or (outcome := self._training.poll()) is None:
            return
        self._training = None
        self._training_stats["running"] = False
        kind, payload = outcome
        if kind == "ok":
            self._record_training(payload)
            if payload["promoted"]:
                self._follow_active_adapter = True
        else:
            self._training_stats["runs"] += 1
            self._training_stats["last_error"] = payload
            logger.error("background training failed: %s", payload)

    def _record_training(self, results: Mapping[str, Any]) -> None:
        stats = self._training_stats
        stats["runs"] += 1
        stats["promotions"] += bool(results["promoted"])
        stats["last_error"] = None
        stats["last"] = {
            k: results.get(k)
            for k in (
                "promoted",
                "promotion",
                "initial_eval_match",
                "best_eval_match",
                "best_loss",
                "global_step",
                "failures_consumed",
                "elapsed_s",
            )
        }

    # -- adapters ------------------------------------------------------------------

    def load_adapter(self, path: str = "best") -> bool:
        """Load an adapter into the draft (fused), replacing any loaded one.

        The system then keeps this adapter (it stops following ``active``) until
        :meth:`train` promotes a new one.

        Args:
            path (str): A checkpoint directory, or an alias under
              ``training.checkpoint_dir`` (``"active"``, ``"previous"``, ``"best"``,
              ``"final"``, ``"latest"``). Default: ``"best"``.

        Returns:
            bool: ``True`` when loaded; ``False`` when no such checkpoint exists
            (yet); the draft keeps its previous weights.

        Raises:
            RuntimeError: the checkpoint exists but cannot be loaded (the draft keeps
              its previous weights).
        """
        self._require_initialized()
        with self._exclusive("load_adapter"):
            loaded = self._load_adapter(path)
            if loaded:
                self._follow_active_adapter = False
            return loaded

    def _load_adapter(self, path: str) -> bool:
        assert self.manager is not None
        if not isinstance(path, str) or not path:
            raise ValueError(f"adapter path must be a non-empty string, got {path!r}")
        try:
            resolved = self.manager.resolve_adapter_path(path, self.config.training.checkpoint_dir)
        except RuntimeError as e:  # a bare name found nowhere: missing, like a missing path
            logger.warning("%s", e)
            return False
        if not resolved.exists():
            logger.warning("no adapter at %s", resolved)
            return False
        self._swap_adapter(resolved)
        return True

    def _active_version(self) -> Path | None:
        active = Path(self.config.training.checkpoint_dir).expanduser() / ACTIVE_ALIAS
        return Path(os.path.realpath(active)) if os.path.lexists(active) else None

    def _follow_active(self) -> None:
        """Serve what ``active`` names now, unless an adapter is pinned."""
        active = self._active_version()
        if not self._follow_active_adapter or active is None or active == self._adapter_path:
            return
        try:
            self._swap_adapter(Path(self.config.training.checkpoint_dir).expanduser() / ACTIVE_ALIAS)
        except RuntimeError as e:
            logger.warning("keeping the current adapter: the active one cannot be loaded: %s", e)

    def _swap_adapter(self, path: Path) -> None:
        assert self.manager is not None
        draft = self.decoder.draft_model
        self.manager.load_lora_adapter(draft, str(path), fuse=True)
        loaded = self.manager.loaded_adapter(draft)
        self._adapter_path = loaded[0] if loaded else None
        self.tracker.reset_recent()

    def unload_adapter(self) -> bool:
        """Restore the draft's base weights.

        The system then serves the base draft (it stops following ``active``)
        until :meth:`train` promotes a new adapter.

        Returns:
            bool: ``True`` if an adapter was unloaded, ``False`` if none was loaded.
        """
        self._require_initialized()
        assert self.manager is not None
        with self._exclusive("unload_adapter"):
            unloaded = self.manager.unload_lora_adapter(self.decoder.draft_model)
            self._adapter_path = None
            self._follow_active_adapter = False
            if unloaded:
                self.tracker.reset_recent()
            return unloaded

    def get_adapter_info(self) -> dict[str, Any]:
        """``loaded``, ``path``, ``rank``, ``alpha``, ``target_modules`` of the draft's adapter."""
        self._require_initialized()
        assert self.manager is not None
        return self.manager.adapter_info(self.decoder.draft_model)

    # -- statistics ----------------------------------------------------------------

    def get_stats(self) -> dict[str, Any]:
        """Counters of this system (see the API reference for the keys).

        Beyond the reference: ``training`` (``running``, ``runs``, ``promotions``,
        ``last``: the last run's promotion decision and figures, ``last_error``)
        and ``active_adapter`` (the version ``active`` names, or ``None``).
        """
        self._poll_training()
        collector = self.collector
        active = self._active_version()
        return {
            "generation_count": self.generation_count,
            "tracker": self.tracker.as_dict(),
            "failure_count": collector.failure_count if collector else 0,
            "replay_buffer_size": collector.replay_buffer_size if collector else 0,
            "adapter_loaded": self._adapter_path is not None,
            "adapter_path": str(self._adapter_path) if self._adapter_path else None,
            "mean_accepted_length": (
                self._accepted_length_sum / self.generation_count if self.generation_count else 0.0
            ),
            "tokens_per_second": self._tokens / self._decode_seconds if self._decode_seconds else 0.0,
            "total_tokens": self._tokens,
            "training": dict(self._training_stats),
            "active_adapter": str(active) if active else None,
        }


__all__ = ["ADAPTER_ALIASES", "MODES", "SpeculativeDecodingSystem"]
