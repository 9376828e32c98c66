"""LoRA training of the draft model on the target's outputs.

The draft learns from the generations where it did badly: cross-entropy on the
tokens the target produced, plus a distillation term that pulls the draft's
distribution toward the target's stored top-k distribution at the positions
where the two disagreed. LoRA layers come from ``mlx_lm.tuner`` and checkpoints
are mlx-lm adapters (see :mod:`speclora.checkpoint`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx import nn
from mlx.utils import tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers
from tqdm import tqdm

from speclora import decoding
from speclora.adapters import unfuse_adapter
from speclora.checkpoint import (
    adapter_weights,
    load_adapter_checkpoint,
    save_adapter_checkpoint,
)
from speclora.config import TrainingConfig
from speclora.losses import draft_loss, loss_sums
from speclora.records import TrainingExample
from speclora.training_data import (
    TokenSequence,
    epoch_sequences,
    holdout_split,
    iterate_batches,
    prepare_examples,
    replay_count,
    top_k_width,
)

logger = logging.getLogger(__name__)

CHECKPOINT_ALIASES = ("latest", "best", "final")


@dataclass
class LoRASpec:
    """The LoRA layers attached to a model, as mlx-lm's adapter config names them."""

    num_layers: int
    keys: list[str]
    rank: int
    scale: float
    dropout: float
    alpha: float
    target_modules: list[str]

    def adapter_config(self) -> dict[str, Any]:
        """The ``adapter_config.json`` contents ``mlx_lm.load`` reads."""
        return {
            "fine_tune_type": "lora",
            "num_layers": self.num_layers,
            "lora_parameters": {
                "rank": self.rank,
                "scale": self.scale,
                "dropout": self.dropout,
                "keys": list(self.keys),
            },
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
        }


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _lora_modules(layer: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in layer.named_modules() if isinstance(m, LoRALinear)]


def _describe_lora(model: nn.Module, config: TrainingConfig) -> LoRASpec:
    """Describe LoRA layers already on ``model`` (e.g. an unfused adapter)."""
    layers = model.layers
    named = [
        (i, n, m) for i, layer in enumerate(layers) for n, m in _lora_modules(layer)
    ]
    if not named:
        raise ValueError("The model's LoRA layers are outside model.layers")
    first = named[0][0]
    keys = {n for _, n, _ in named}
    found = [m for _, _, m in named]
    rank = int(found[0].lora_a.shape[1])
    scale = float(found[0].scale)
    # nn.Dropout keeps only the keep probability, 1 - p.
    dropout = 1.0 - float(getattr(found[0].dropout, "_p_1", 1.0))
    if any(int(m.lora_a.shape[1]) != rank or float(m.scale) != scale for m in found):
        logger.warning(
            "The model's LoRA layers differ in rank or scale; using the first"
        )
    if rank != config.rank or not math.isclose(scale, config.alpha / config.rank):
        logger.warning(
            "Reusing the model's LoRA layers (rank %d, scale %g) instead of "
            "training.rank=%d, training.alpha=%g",
            rank,
            scale,
            config.rank,
            config.alpha,
        )
    targets = sorted({k.rsplit(".", 1)[-1] for k in keys})
    return LoRASpec(
        num_layers=len(layers) - first,
        keys=sorted(keys),
        rank=rank,
        scale=scale,
        dropout=dropout,
        alpha=scale * rank,
        target_modules=targets,
    )


def attach_lora(model: nn.Module, config: TrainingConfig) -> LoRASpec:
    """Give ``model`` trainable LoRA layers and freeze everything else.

    LoRA layers already on the model (an adapter loaded unfused) are reused as
    they are; otherwise the ``target_modules`` of the last ``num_layers`` blocks
    are converted with ``mlx_lm.tuner.utils.linear_to_lora_layers`` at
    ``scale = alpha / rank``.

    Args:
        model (nn.Module): An mlx-lm model (it must expose ``model.layers``);
            modified in place.
        config (TrainingConfig): LoRA settings (``rank``, ``alpha``,
            ``dropout``, ``target_modules``, ``num_layers``, ``seed``).

    Returns:
        LoRASpec: The LoRA layout, as saved in ``adapter_config.json``.

    Raises:
        ValueError: If the model has no ``layers``, ``num_layers`` exceeds them,
            or a target module matches no linear layer.
    """
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError(
            f"Cannot add LoRA layers to {type(model).__name__}: it has no 'layers' "
            "attribute (an mlx-lm model is expected)"
        )
    if any(_lora_modules(layer) for layer in layers):
        spec = _describe_lora(model, config)
    else:
        n = len(layers)
        num_layers = n if config.num_layers == -1 else config.num_layers
        if num_layers > n:
            raise ValueError(
                f"training.num_layers={config.num_layers} exceeds the model's {n} "
                "layers (use -1 for all)"
            )
        linear_types = (nn.Linear, nn.QuantizedLinear)
        keys = {
            name
            for layer in layers[n - num_layers :]
            for name, m in layer.named_modules()
            if isinstance(m, linear_types)
            and any(_matches(name, t) for t in config.target_modules)
        }
        missing = [
            t for t in config.target_modules if not any(_matches(k, t) for k in keys)
        ]
        if missing:
            available = sorted(
                name
                for name, m in layers[-1].named_modules()
                if isinstance(m, linear_types)
            )
            raise ValueError(
                f"training.target_modules entries {missing} match no linear layer; "
                f"the model's layers have {available}"
            )
        spec = LoRASpec(
            num_layers=num_layers,
            keys=sorted(keys),
            rank=config.rank,
            scale=config.alpha / config.rank,
            dropout=config.dropout,
            alpha=config.alpha,
            target_modules=list(config.target_modules),
        )
        # LoRA A matrices are drawn from the global generator: seed it so the
        # initial adapter is reproducible.
        mx.random.seed(config.seed)
        lora_parameters = spec.adapter_config()["lora_parameters"]
        linear_to_lora_layers(model, num_layers, lora_parameters)
    model.freeze()
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    mx.eval(model.parameters())
    return spec


def check_overrides(num_epochs: int | None, learning_rate: float | None) -> None:
    """Refuse per-call overrides of ``training.num_epochs`` / ``learning_rate``.

    Raises:
        ValueError: naming the argument and its value.
    """
    if num_epochs is not None and (
        isinstance(num_epochs, bool)
        or not isinstance(num_epochs, int)
        or num_epochs < 1
    ):
        raise ValueError(f"num_epochs must be an int >= 1, got {num_epochs!r}")
    if learning_rate is not None and (
        isinstance(learning_rate, bool)
        or not isinstance(learning_rate, (int, float))
        or not (math.isfinite(learning_rate) and learning_rate > 0)
    ):
        raise ValueError(
            f"learning_rate must be a finite float > 0, got {learning_rate!r}"
        )


def train_step(
    model: nn.Module,
    loss: Callable[..., mx.array],
    optimizer: optim.Optimizer,
    *,
    grad_clip: float | None = None,
    group: mx.distributed.Group | None = None,
) -> Callable[..., mx.array]:
    """A compiled optimizer step: ``step(*batch)`` returns the batch's loss,
    evaluated with the updated model and optimizer state.

    Args:
        model (nn.Module): The model; its trainable parameters are updated.
        loss (Callable): ``loss(model, *batch) -> mx.array``, a scalar.
        optimizer (optim.Optimizer): The optimizer; initialised here.
        grad_clip (float, optional): Clip the gradient to this global norm.
            Default: ``None``.
        group (mx.distributed.Group, optional): Ranks training data-parallel;
            losses and gradients are averaged across them. Default: ``None``.
    """
    size = 1 if group is None else group.size()
    optimizer.init(model.trainable_parameters())
    loss_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]

    @functools.partial(mx.compile, inputs=state, outputs=state)
    def step(*batch: mx.array) -> mx.array:
        value, grads = loss_and_grad(model, *batch)
        if size > 1:
            # Before clipping: the norm is the whole batch's gradient's.
            value = mx.distributed.all_sum(value, group=group) / size
            grads = nn.average_gradients(grads, group=group)
        if grad_clip is not None:
            grads, _ = optim.clip_grad_norm(grads, grad_clip)
        optimizer.update(model, grads)
        return value

    def evaluated_step(*batch: mx.array) -> mx.array:
        value = step(*batch)
        mx.eval(value, state)
        return value

    return evaluated_step


def train_epochs(
    model: nn.Module,
    step: Callable[..., mx.array],
    epoch_sequences: Callable[[], Sequence[TokenSequence]],
    config: TrainingConfig,
    *,
    epochs: int,
    top_k: int,
    learning_rate: float,
    group: mx.distributed.Group | None = None,
    on_step: Callable[[int, int, float], None],
) -> Iterator[tuple[int, list[float]]]:
    """The training loop: every epoch, ``step`` over batches of
    ``epoch_sequences()`` (this rank's share of each) in train mode, calling
    ``on_step(step_number, epoch, loss)``; yields ``(epoch, its losses)``.

    Raises:
        RuntimeError: On a non-finite loss (naming ``learning_rate``).
    """
    rank, size = (0, 1) if group is None else (group.rank(), group.size())
    global_step = 0
    for epoch in range(1, epochs + 1):
        model.train()
        losses: list[float] = []
        seqs = epoch_sequences()
        for batch in iterate_batches(seqs, config.batch_size, top_k, rank, size):
            loss = float(np.asarray(step(*batch)))
            global_step += 1
            if not math.isfinite(loss):
                raise RuntimeError(
                    f"LoRA training diverged: loss is {loss} at step {global_step} "
                    f"(epoch {epoch}); try a lower learning_rate (now "
                    f"{learning_rate:g}) or set training.grad_clip"
                )
            losses.append(loss)
            on_step(global_step, epoch, loss)
        yield epoch, losses


def evaluate(
    model: nn.Module, seqs: Sequence[TokenSequence], config: TrainingConfig, top_k: int
) -> tuple[float, float, int]:
    """Score ``seqs`` in eval mode, without updates.

    Under ``mlx.launch`` each rank scores every size-th sequence and the ranks
    add up their sums, so every rank must call this.

    Returns:
        tuple[float, float, int]: The training loss (CE over all output tokens
        and KL over all disagreements of the set, not per batch); the share of
        output tokens the draft predicts exactly (its argmax given the true
        prefix: the per-token acceptance rate of greedy speculation); and how
        many tokens that share is over. Both are ``nan`` without output tokens.
    """
    if not seqs:
        return math.nan, math.nan, 0
    model.eval()
    totals = np.zeros(5, dtype=np.float64)
    group = mx.distributed.init()
    mine = seqs[group.rank() :: group.size()]
    for batch in iterate_batches(mine, config.batch_size, top_k):
        logits = model(batch.inputs).astype(mx.float32)
        hits = (mx.argmax(logits, axis=-1) == batch.targets) * batch.ce_mask
        sums = (*loss_sums(logits, batch, config), hits.sum())
        mx.eval(sums)
        totals += np.array([np.asarray(x) for x in sums], dtype=np.float64)
    if group.size() > 1:
        summed = mx.distributed.all_sum(mx.array(totals, mx.float64), stream=mx.cpu)
        totals = np.asarray(summed, dtype=np.float64)
    ce_sum, n_tok, kl_sum, n_dis, n_hit = totals
    loss = ce_sum / max(n_tok, 1.0)
    if config.distill_weight > 0:
        loss += config.distill_weight * kl_sum / max(n_dis, 1.0)
    return float(loss), (n_hit / n_tok if n_tok else math.nan), int(n_tok)


def load_resume(
    model: nn.Module, source: str | Path | Mapping[str, mx.array], lora: LoRASpec
) -> None:
    """Load an mlx-lm adapter (directory, ``adapters.safetensors`` file, or
    weights by name) into ``model``'s LoRA layers, laid out as ``lora``.

    Raises:
        RuntimeError: If it cannot be read or does not match the layers.
    """
    label = "given in memory" if isinstance(source, Mapping) else str(source)
    saved_scale = None
    weights: dict[str, mx.array]
    if isinstance(source, Mapping):
        weights = dict(source)
    elif (path := Path(source).expanduser()).is_file():
        try:
            read = mx.load(str(path))
        except (OSError, ValueError, RuntimeError) as e:
            raise RuntimeError(f"Failed to read adapter weights {path}: {e}") from e
        assert isinstance(read, dict)
        weights = read
    else:
        weights, config, _ = load_adapter_checkpoint(path)
        saved_scale = (config.get("lora_parameters") or {}).get("scale")
    own = adapter_weights(model)
    problems = [f"{k}: not in the model's LoRA layers" for k in weights if k not in own]
    problems += [f"{k}: missing from the adapter" for k in own if k not in weights]
    problems += [
        f"{k}: shape {tuple(w.shape)} != model's {tuple(own[k].shape)}"
        for k, w in weights.items()
        if k in own and tuple(w.shape) != tuple(own[k].shape)
    ]
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise RuntimeError(
            f"Cannot resume from adapter {label}: it does not match the model's LoRA "
            f"layers (rank {lora.rank}, keys {lora.keys}): {shown}{more}"
        )
    if saved_scale is not None and not math.isclose(float(saved_scale), lora.scale):
        logger.warning(
            "Adapter %s was trained with scale %g; continuing with scale %g",
            label,
            float(saved_scale),
            lora.scale,
        )
    model.update(
        tree_unflatten([(k, w.astype(own[k].dtype)) for k, w in weights.items()])
    )
    mx.eval(model.trainable_parameters())


class LoRATrainer:
    """Train LoRA adapters on the draft model from collected failures.

    The trainer trains the model it is given **in place**: the constructor adds
    LoRA layers (or reuses ones already there) and freezes the base weights, and
    after :meth:`train` the model holds the final, unfused LoRA weights and is in
    eval mode. If training fails the model's LoRA weights are put back to what
    they were when :meth:`train` was called.

    Loss per batch::

        CE(draft predicts output tokens)            # prompt positions masked
        + distill_weight * KL(p_target_topk || q_draft)   # disagreement positions

    ``p_target_topk`` is the target's stored top-k distribution
    (``Disagreement.top_k_logprobs``) renormalised over its k tokens, and
    ``q_draft`` the draft's softmax at temperature ``distill_temperature``
    restricted to the same k tokens and renormalised. A disagreement at output
    position ``p`` uses the logits at sequence index ``len(prompt) + p - 1``
    (those predicting output token ``p``). Both terms are means: CE over output
    tokens, KL over disagreement positions in the batch.

    Args:
        model (nn.Module): The draft model (an mlx-lm model); modified in place.
        tokenizer: Anything with ``encode(text, add_special_tokens=False)``;
            used for examples whose ``output_tokens`` is empty.
        config (Mapping | TrainingConfig): The ``training`` config section.
        show_progress (bool): Show a tqdm progress bar during training.
            Default: ``False``.

    Raises:
        ValueError: If the config is invalid or LoRA layers cannot be placed.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        config: Mapping[str, Any] | TrainingConfig,
        *,
        show_progress: bool = False,
    ) -> None:
        self.config = (
            config
            if isinstance(config, TrainingConfig)
            else TrainingConfig.from_dict(config)
        )
        self.model = model
        self.tokenizer = tokenizer
        self.show_progress = show_progress
        fused = unfuse_adapter(model)
        if fused is not None:
            logger.info(
                "training continues from adapter %s, unfused for training", fused
            )
        self.lora = attach_lora(model, self.config)
        self.checkpoint_dir = Path(self.config.checkpoint_dir).expanduser()

    @property
    def vocab_size(self) -> int:
        """Size of the draft's output vocabulary (from the model's ``args``)."""
        return decoding.vocab_size(self.model)

    def _prepare(
        self, examples: Sequence[TrainingExample | Mapping[str, Any]], what: str
    ) -> tuple[list[TokenSequence], list[str]]:
        max_len = self.config.max_seq_length
        return prepare_examples(
            examples, what, self.tokenizer, self.vocab_size, max_len
        )

    def evaluate(
        self, examples: Sequence[TrainingExample | Mapping[str, Any]]
    ) -> float:
        """The training loss over ``examples``, without dropout or updates.

        CE is averaged over all output tokens and KL over all disagreement
        positions of the set (not per batch).

        Args:
            examples (Sequence[TrainingExample]): The examples.

        Returns:
            float: The loss (``nan`` when no example has an output token).
        """
        seqs, _ = self._prepare(examples, "examples")
        return evaluate(self.model, seqs, self.config, top_k_width(seqs))[0]

    def train(
        self,
        training_examples: Sequence[TrainingExample | Mapping[str, Any]],
        replay_buffer: Sequence[TrainingExample | Mapping[str, Any]] = (),
        *,
        num_epochs: int | None = None,
        learning_rate: float | None = None,
        resume_from: str | Path | Mapping[str, mx.array] | None = None,
        on_step: Callable[[int, float], None] | None = None,
    ) -> dict[str, Any]:
        """Train the LoRA layers on failures plus replayed past examples.

        A held-out ``eval_fraction`` of ``training_examples`` and of
        ``replay_buffer`` (at least one of each when there are two or more) is
        scored after every epoch; the lowest score
        decides ``best`` (the mean training loss of the epoch when nothing is
        held out). Each epoch mixes in
        ``round(replay_ratio * n / (1 - replay_ratio))`` examples drawn from
        ``replay_buffer`` (capped by its size; all of it at ratio 1). Checkpoints:
        ``latest`` after every epoch, ``best`` when the score improves, ``final``
        at the end.

        Args:
            training_examples (Sequence[TrainingExample]): Failures to learn
                from; dicts are converted with ``TrainingExample.from_dict``.
            replay_buffer (Sequence[TrainingExample]): Past examples replayed
                against forgetting. Default: ``()``.
            num_epochs (int, optional): Overrides ``training.num_epochs``.
            learning_rate (float, optional): Overrides ``training.learning_rate``.
            resume_from (str | Path | Mapping, optional): An mlx-lm adapter
                directory (or ``adapters.safetensors`` file), or its weights
                already read (name -> array), that initialise training, e.g. the
                previous round's ``best``.
            on_step (Callable[[int, float], None], optional): Called after every
                optimizer step with the step number (from 1) and its loss.

        Returns:
            dict: ``final_loss`` (last epoch's score), ``best_loss`` (lowest
            score), ``global_step`` (optimizer steps in this call),
            ``checkpoint_path`` (the ``best`` directory), ``final_path``,
            ``latest_path``, ``losses`` (per step), ``eval_losses`` (per epoch;
            empty when nothing is held out), ``initial_eval_loss`` (before
            training, or ``None``), ``initial_eval_match`` and
            ``best_eval_match`` (share of held-out output tokens the draft
            predicts exactly before training and at the best checkpoint, or
            ``None``), ``eval_tokens`` (how many held-out output tokens those
            shares are over), ``train_loss`` (last epoch's mean),
            ``num_examples`` (failures trained on), ``num_eval`` (held out),
            ``num_replay`` (replayed per epoch), ``elapsed_s``.

        Raises:
            ValueError: If there are fewer than ``min_examples`` training
                examples, or an override or example is invalid.
            RuntimeError: If ``resume_from`` cannot be loaded or does not match,
                or training fails (non-finite loss, checkpoint write error, ...);
                the model's LoRA weights are then restored.

        Note:
            Seeds MLX's global random generator with ``training.seed`` (dropout
            masks) so that a run is reproducible.
        """
        cfg = self.config
        start = time.perf_counter()
        check_overrides(num_epochs, learning_rate)
        if len(training_examples) < cfg.min_examples:
            raise ValueError(
                f"Not enough training examples: have {len(training_examples)}, need at "
                f"least {cfg.min_examples} (training.min_examples)"
            )
        seqs, train_ids = self._prepare(training_examples, "training examples")
        if not seqs:
            raise ValueError(
                f"None of the {len(training_examples)} training examples has an output "
                f"token within training.max_seq_length={cfg.max_seq_length}"
            )
        train_id_set = set(train_ids)
        replay_examples = [
            ex
            for ex in replay_buffer
            if (ex.id if isinstance(ex, TrainingExample) else ex.get("id"))
            not in train_id_set
        ]
        replay, _ = self._prepare(replay_examples, "replay examples")
        rng = np.random.default_rng(cfg.seed)
        train_set, eval_set = holdout_split(seqs, cfg.eval_fraction, rng)
        # Past examples are held out too, so that the best checkpoint (and the
        # promotion gate) also answers "did it forget what it knew?".
        replay, replay_eval = holdout_split(replay, cfg.eval_fraction, rng)
        mx.random.seed(cfg.seed)
        with contextlib.ExitStack() as rollback:
            # Unless training succeeds, the LoRA weights go back as they were.
            snapshot = tree_unflatten(list(adapter_weights(self.model).items()))
            rollback.callback(self.model.eval)
            rollback.callback(self.model.update, snapshot)
            try:
                result = self._fit(
                    train_set,
                    eval_set + replay_eval,
                    replay,
                    rng,
                    epochs=cfg.num_epochs if num_epochs is None else num_epochs,
                    learning_rate=float(learning_rate or cfg.learning_rate),
                    resume_from=resume_from,
                    on_step=on_step,
                )
            except (RuntimeError, ValueError):
                raise
            except Exception as e:
                message = f"LoRA training failed: {type(e).__name__}: {e}"
                raise RuntimeError(message) from e
            rollback.pop_all()
        return {**result, "elapsed_s": time.perf_counter() - start}

    def _fit(
        self,
        train_set: list[TokenSequence],
        eval_set: list[TokenSequence],
        replay: list[TokenSequence],
        rng: np.random.Generator,
        *,
        epochs: int,
        learning_rate: float,
        resume_from: str | Path | Mapping[str, mx.array] | None,
        on_step: Callable[[int, float], None] | None,
    ) -> dict[str, Any]:
        cfg, model = self.config, self.model
        if resume_from is not None:
            load_resume(model, resume_from, self.lora)
        # Under mlx.launch the ranks train data-parallel: each takes its share
        # of every batch, and losses and gradients are averaged across ranks.
        group = mx.distributed.init()
        parallel = group if group.size() > 1 else None
        optimizer = optim.AdamW(learning_rate=learning_rate)
        loss = draft_loss(cfg, parallel)
        step = train_step(
            model, loss, optimizer, grad_clip=cfg.grad_clip, group=parallel
        )
        num_replay = replay_count(len(train_set), len(replay), cfg.replay_ratio)
        top_k = top_k_width(train_set + eval_set + replay)
        sizes = {
            "num_examples": len(train_set),
            "num_eval": len(eval_set),
            "num_replay": num_replay,
        }
        initial_eval, initial_match, eval_tokens = (
            evaluate(model, eval_set, cfg, top_k) if eval_set else (None, None, 0)
        )
        match = best_match = initial_match
        losses: list[float] = []
        eval_losses: list[float] = []
        best = score = math.inf
        train_loss = math.nan
        paths = {alias: self.checkpoint_dir / alias for alias in CHECKPOINT_ALIASES}
        # The path, or None (no resume, or weights given in memory).
        resumed_from = (
            str(resume_from) if isinstance(resume_from, (str, Path)) else None
        )
        bar = tqdm(
            total=epochs * -(-(len(train_set) + num_replay) // cfg.batch_size),
            desc="LoRA training",
            unit="step",
            disable=not self.show_progress or group.rank() != 0,
        )

        def after_step(global_step: int, epoch: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch)
            if on_step is not None:
                on_step(global_step, loss)

        epoch_seqs = functools.partial(
            epoch_sequences, train_set, replay, num_replay, rng
        )
        run = train_epochs(
            model,
            step,
            epoch_seqs,
            cfg,
            epochs=epochs,
            top_k=top_k,
            learning_rate=learning_rate,
            group=parallel,
            on_step=after_step,
        )
        try:
            for epoch, epoch_losses in run:
                losses += epoch_losses
                train_loss = score = float(np.mean(epoch_losses))
                if eval_set:
                    score, match, _ = evaluate(model, eval_set, cfg, top_k)
                    if not math.isfinite(score):
                        raise RuntimeError(
                            f"LoRA training diverged: eval loss is {score} after "
                            f"epoch {epoch}"
                        )
                    eval_losses.append(score)
                logger.info(
                    "epoch %d/%d: train loss %.4f%s",
                    epoch,
                    epochs,
                    train_loss,
                    f", eval loss {score:.4f}" if eval_set else "",
                )
                improved = score < best
                best = min(best, score)
                best_match = match if improved else best_match
                state = {
                    "step": len(losses),
                    "epoch": epoch,
                    "num_epochs": epochs,
                    "learning_rate": learning_rate,
                    "train_loss": train_loss,
                    "eval_loss": score if eval_set else None,
                    "eval_match": match,
                    "best_loss": best,
                    "losses": list(losses),
                    "eval_losses": list(eval_losses),
                    **sizes,
                    "resumed_from": resumed_from,
                }
                saves = {"latest": True, "best": improved, "final": epoch == epochs}
                for alias in CHECKPOINT_ALIASES:
                    # The ranks hold identical weights: one writer, and the
                    # other ranks never touch checkpoint_dir.
                    if saves[alias] and group.rank() == 0:
                        config = self.lora.adapter_config()
                        save_adapter_checkpoint(model, paths[alias], config, state)
        finally:
            bar.close()
            model.eval()

        return {
            "final_loss": score,
            "best_loss": best,
            "global_step": len(losses),
            "checkpoint_path": str(paths["best"]),
            "final_path": str(paths["final"]),
            "latest_path": str(paths["latest"]),
            "losses": losses,
            "eval_losses": eval_losses,
            "initial_eval_loss": initial_eval,
            "initial_eval_match": initial_match,
            "best_eval_match": best_match,
            "eval_tokens": eval_tokens,
            "train_loss": train_loss,
            **sizes,
        }
