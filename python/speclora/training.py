"""LoRA training of the draft model on the target's outputs.

The draft learns from the generations where it did badly: cross-entropy on the
tokens the target produced, plus a distillation term that pulls the draft's
distribution toward the target's stored top-k distribution at the positions
where the two disagreed. LoRA layers come from ``mlx_lm.tuner`` and checkpoints
are mlx-lm adapters (see :mod:`speclora.checkpoint`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers
from tqdm import tqdm

from speclora.checkpoint import (
    adapter_weights,
    load_adapter_checkpoint,
    save_adapter_checkpoint,
)
from speclora.config import TrainingConfig
from speclora.adapters import unfuse_adapter
from speclora.records import TrainingExample

logger = logging.getLogger(__name__)

CHECKPOINT_ALIASES = ("latest", "best", "final")

# Sequence lengths are padded up to a multiple of this so the compiled step is
# traced for a handful of shapes rather than one per batch.
_LENGTH_BUCKET = 16

# Stands in for -inf on padded top-k slots: finite so 0 * it stays 0 in the
# gradient, small enough that exp() of it is exactly 0 in float32.
_MASKED_LOGIT = -1e9


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


@dataclass
class _Sequence:
    """One tokenized example: what the loss needs, as numpy arrays."""

    tokens: np.ndarray  # [L] int32, prompt followed by output, truncated
    prompt_len: int
    distill_index: np.ndarray  # [D] int32, logit positions of the disagreements
    distill_ids: list[np.ndarray]  # D x [k] int32, target's top-k token ids
    distill_logp: list[np.ndarray]  # D x [k] float32, renormalised log-probabilities


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _lora_modules(layer: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in layer.named_modules() if isinstance(m, LoRALinear)]


def _describe_lora(model: nn.Module, config: TrainingConfig) -> LoRASpec:
    """Describe LoRA layers already on ``model`` (e.g. an unfused adapter)."""
    layers = model.layers
    keys: set[str] = set()
    first = len(layers)
    found: list[LoRALinear] = []
    for i, layer in enumerate(layers):
        mods = _lora_modules(layer)
        if mods:
            first = min(first, i)
        for name, m in mods:
            keys.add(name)
            found.append(m)
    if not found:
        raise ValueError("The model's LoRA layers are outside model.layers")
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
        keys: set[str] = set()
        for layer in layers[n - num_layers :]:
            for name, m in layer.named_modules():
                if isinstance(m, linear_types) and any(
                    _matches(name, t) for t in config.target_modules
                ):
                    keys.add(name)
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
        scale = config.alpha / config.rank
        # LoRA A matrices are drawn from the global generator: seed it so the
        # initial adapter is reproducible.
        mx.random.seed(config.seed)
        model.freeze()
        linear_to_lora_layers(
            model,
            num_layers,
            {
                "rank": config.rank,
                "scale": scale,
                "dropout": config.dropout,
                "keys": sorted(keys),
            },
        )
        spec = LoRASpec(
            num_layers=num_layers,
            keys=sorted(keys),
            rank=config.rank,
            scale=scale,
            dropout=config.dropout,
            alpha=config.alpha,
            target_modules=list(config.target_modules),
        )
    model.freeze()
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    mx.eval(model.parameters())
    return spec


def _distill_loss_terms(
    logits: mx.array,  # [B, T, V] float32
    topk_ids: mx.array,  # [B, T, K] int32
    target_p: mx.array,  # [B, T, K] float32, 0 on padded slots
    target_logp: mx.array,  # [B, T, K] float32, 0 on padded slots
    topk_valid: mx.array,  # [B, T, K] bool
    inv_temperature: float,
) -> mx.array:  # [B, T] float32
    """Forward KL(p_target_topk || q_draft_topk) at every position."""
    z = mx.take_along_axis(logits, topk_ids, axis=-1) * inv_temperature
    z = mx.where(topk_valid, z, _MASKED_LOGIT)
    # Softmax over the k slots == the draft's softmax renormalised over them.
    log_q = z - mx.logsumexp(z, axis=-1, keepdims=True)
    return (target_p * (target_logp - log_q)).sum(axis=-1)


def check_overrides(num_epochs: int | None, learning_rate: float | None) -> None:
    """Refuse per-call overrides of ``training.num_epochs`` / ``learning_rate``.

    Raises:
        ValueError: naming the argument and its value.
    """
    if num_epochs is not None and (
        isinstance(num_epochs, bool) or not isinstance(num_epochs, int) or num_epochs < 1
    ):
        raise ValueError(f"num_epochs must be an int >= 1, got {num_epochs!r}")
    if learning_rate is not None and (
        isinstance(learning_rate, bool)
        or not isinstance(learning_rate, (int, float))
        or not (math.isfinite(learning_rate) and learning_rate > 0)
    ):
        raise ValueError(f"learning_rate must be a finite float > 0, got {learning_rate!r}")


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
            logger.info("training continues from adapter %s, unfused for training", fused)
        self.lora = attach_lora(model, self.config)
        self.checkpoint_dir = Path(self.config.checkpoint_dir).expanduser()
        self._vocab_size: int | None = None

    # ------------------------------------------------------------------ data

    @property
    def vocab_size(self) -> int:
        """Size of the draft's output vocabulary (measured by one forward pass)."""
        if self._vocab_size is None:
            self._vocab_size = int(
                self.model(mx.array([[0]], dtype=mx.int32)).shape[-1]
            )
        return self._vocab_size

    def _encode(self, text: str) -> list[int]:
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            ids = self.tokenizer.encode(text)
        return [int(t) for t in ids]

    def _prepare(self, example: TrainingExample) -> _Sequence | None:
        """Tokenize one example; ``None`` when it has no output token to learn.

        Raises:
            ValueError: If a token id falls outside the draft's vocabulary (the
              example was collected with another tokenizer, or is damaged).
        """
        vocab = self.vocab_size
        prompt = list(example.prompt_tokens)
        output = list(example.output_tokens) or self._encode(example.target_output)
        tokens = (prompt + output)[: self.config.max_seq_length]
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"Training example {example.id!r} has token id {bad[0]} outside the "
                f"draft's vocabulary of {vocab}"
            )
        prompt_len = len(prompt)
        num_inputs = len(tokens) - 1
        # The first output token is only predictable if something precedes it.
        if num_inputs < 1 or len(tokens) <= max(prompt_len, 1):
            return None
        by_index: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for d in example.disagreements:
            index = prompt_len + d.position - 1
            if not 0 <= index < num_inputs or not d.top_k_tokens:
                continue  # truncated away, or nothing to distil
            # Checked before the int32 conversion, which would overflow.
            bad = [t for t in d.top_k_tokens if not 0 <= t < vocab]
            if bad:
                raise ValueError(
                    f"Training example {example.id!r}: disagreement at position "
                    f"{d.position} has top-k token {bad[0]} outside the draft's "
                    f"vocabulary of {vocab}"
                )
            ids = np.asarray(d.top_k_tokens, dtype=np.int32)
            logp = np.asarray(d.top_k_logprobs, dtype=np.float64)
            logp = logp - (logp.max() + np.log(np.exp(logp - logp.max()).sum()))
            by_index[index] = (ids, logp.astype(np.float32))
        order = sorted(by_index)
        return _Sequence(
            tokens=np.asarray(tokens, dtype=np.int32),
            prompt_len=prompt_len,
            distill_index=np.asarray(order, dtype=np.int32),
            distill_ids=[by_index[i][0] for i in order],
            distill_logp=[by_index[i][1] for i in order],
        )

    def _prepare_all(
        self, examples: Sequence[TrainingExample | Mapping[str, Any]], what: str
    ) -> tuple[list[_Sequence], list[str]]:
        seqs: list[_Sequence] = []
        ids: list[str] = []
        skipped = 0
        unusable: list[str] = []
        for ex in examples:
            if not isinstance(ex, TrainingExample):
                ex = TrainingExample.from_dict(ex)
            try:
                seq = self._prepare(ex)
            except ValueError as e:
                # One example this draft cannot learn from must not stop the rest.
                unusable.append(str(e))
                continue
            if seq is None:
                skipped += 1
                continue
            seqs.append(seq)
            ids.append(ex.id)
        if skipped:
            logger.warning(
                "Skipped %d %s with no output token within max_seq_length=%d",
                skipped,
                what,
                self.config.max_seq_length,
            )
        if unusable:
            more = f" (and {len(unusable) - 10} more)" if len(unusable) > 10 else ""
            logger.warning(
                "Skipped %d %s that cannot be used with this draft: %s%s",
                len(unusable),
                what,
                "; ".join(unusable[:10]),
                more,
            )
        return seqs, ids

    @staticmethod
    def _batch(seqs: Sequence[_Sequence], top_k: int) -> tuple[mx.array, ...]:
        """Pad sequences into the loss's input arrays."""
        b = len(seqs)
        longest = max(len(s.tokens) - 1 for s in seqs)
        t = -(-longest // _LENGTH_BUCKET) * _LENGTH_BUCKET
        inputs = np.zeros((b, t), dtype=np.int32)
        targets = np.zeros((b, t), dtype=np.int32)
        ce_mask = np.zeros((b, t), dtype=np.float32)
        topk_ids = np.zeros((b, t, top_k), dtype=np.int32)
        target_p = np.zeros((b, t, top_k), dtype=np.float32)
        target_logp = np.zeros((b, t, top_k), dtype=np.float32)
        topk_valid = np.zeros((b, t, top_k), dtype=bool)
        distill_mask = np.zeros((b, t), dtype=np.float32)
        for row, s in enumerate(seqs):
            n = len(s.tokens) - 1
            inputs[row, :n] = s.tokens[:-1]
            targets[row, :n] = s.tokens[1:]
            # targets[j] is sequence token j + 1: output tokens start at j = P - 1.
            ce_mask[row, max(s.prompt_len - 1, 0) : n] = 1.0
            for index, ids, logp in zip(s.distill_index, s.distill_ids, s.distill_logp):
                k = len(ids)
                topk_ids[row, index, :k] = ids
                target_logp[row, index, :k] = logp
                target_p[row, index, :k] = np.exp(logp)
                topk_valid[row, index, :k] = True
                distill_mask[row, index] = 1.0
        return tuple(
            mx.array(a)
            for a in (
                inputs,
                targets,
                ce_mask,
                topk_ids,
                target_p,
                target_logp,
                topk_valid,
                distill_mask,
            )
        )

    # ------------------------------------------------------------------ loss

    def _loss_sums(
        self,
        model: nn.Module,
        inputs: mx.array,  # [B, T] int32
        targets: mx.array,  # [B, T] int32
        ce_mask: mx.array,  # [B, T] float32
        topk_ids: mx.array,  # [B, T, K] int32
        target_p: mx.array,  # [B, T, K] float32
        target_logp: mx.array,  # [B, T, K] float32
        topk_valid: mx.array,  # [B, T, K] bool
        distill_mask: mx.array,  # [B, T] float32
    ) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """CE sum, CE token count, KL sum, disagreement count."""
        logits = model(inputs).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, targets) * ce_mask
        kl = _distill_loss_terms(
            logits,
            topk_ids,
            target_p,
            target_logp,
            topk_valid,
            1.0 / self.config.distill_temperature,
        )
        return ce.sum(), ce_mask.sum(), (kl * distill_mask).sum(), distill_mask.sum()

    def _batch_loss(self, model: nn.Module, *batch: mx.array) -> mx.array:
        ce_sum, n_tok, kl_sum, n_dis = self._loss_sums(model, *batch)
        loss = ce_sum / mx.maximum(n_tok, 1.0)
        if self.config.distill_weight > 0:
            loss = loss + self.config.distill_weight * kl_sum / mx.maximum(n_dis, 1.0)
        return loss

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
        seqs, _ = self._prepare_all(examples, "examples")
        return self._evaluate(seqs, self._top_k(seqs))

    def _evaluate(self, seqs: Sequence[_Sequence], top_k: int) -> float:
        if not seqs:
            return math.nan
        self.model.eval()
        totals = np.zeros(4, dtype=np.float64)
        bs = self.config.batch_size
        # Under mlx.launch each rank scores every size-th sequence and the
        # ranks add up their sums, so every rank must call this.
        group = mx.distributed.init()
        mine = seqs[group.rank() :: group.size()]
        for i in range(0, len(mine), bs):
            sums = self._loss_sums(self.model, *self._batch(mine[i : i + bs], top_k))
            mx.eval(sums)
            totals += np.array([np.asarray(x) for x in sums], dtype=np.float64)
        if group.size() > 1:
            summed = mx.distributed.all_sum(
                mx.array(totals, dtype=mx.float64), stream=mx.cpu
            )
            totals = np.asarray(summed, dtype=np.float64)
        ce_sum, n_tok, kl_sum, n_dis = totals
        loss = ce_sum / max(n_tok, 1.0)
        if self.config.distill_weight > 0:
            loss += self.config.distill_weight * kl_sum / max(n_dis, 1.0)
        return float(loss)

    def _match_rate(self, seqs: Sequence[_Sequence]) -> tuple[float, int]:
        """Share of output tokens the draft predicts exactly (its argmax given the
        true prefix: the per-token acceptance rate of greedy speculation), and
        how many tokens that share is over."""
        self.model.eval()
        hits = total = 0.0
        bs = self.config.batch_size
        for i in range(0, len(seqs), bs):
            inputs, targets, ce_mask, *_ = self._batch(seqs[i : i + bs], self._top_k(seqs))
            predicted = mx.argmax(self.model(inputs), axis=-1)
            counts = ((predicted == targets) * ce_mask).sum(), ce_mask.sum()
            mx.eval(counts)
            hits += float(np.asarray(counts[0]))
            total += float(np.asarray(counts[1]))
        return (hits / total if total else math.nan), int(total)

    @staticmethod
    def _top_k(seqs: Sequence[_Sequence]) -> int:
        return max((len(ids) for s in seqs for ids in s.distill_ids), default=1)

    # ------------------------------------------------------------ checkpoints

    def _load_resume(self, source: str | Path | Mapping[str, mx.array]) -> None:
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
        own = adapter_weights(self.model)
        problems = [
            f"{k}: not in the model's LoRA layers" for k in weights if k not in own
        ]
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
                f"layers (rank {self.lora.rank}, keys {self.lora.keys}): {shown}{more}"
            )
        if saved_scale is not None and not math.isclose(
            float(saved_scale), self.lora.scale
        ):
            logger.warning(
                "Adapter %s was trained with scale %g; continuing with scale %g",
                label,
                float(saved_scale),
                self.lora.scale,
            )
        self.model.update(
            tree_unflatten([(k, w.astype(own[k].dtype)) for k, w in weights.items()])
        )
        mx.eval(self.model.trainable_parameters())

    def _save(self, alias: str, state: Mapping[str, Any]) -> Path:
        return save_adapter_checkpoint(
            self.model,
            self.checkpoint_dir / alias,
            self.lora.adapter_config(),
            state,
        )

    # ----------------------------------------------------------------- train

    def _split(
        self, seqs: list[_Sequence], rng: np.random.Generator
    ) -> tuple[list[_Sequence], list[_Sequence]]:
        n = len(seqs)
        n_eval = 0
        if self.config.eval_fraction > 0 and n >= 2:
            n_eval = min(max(1, round(self.config.eval_fraction * n)), n - 1)
        order = rng.permutation(n)
        eval_set = [seqs[i] for i in order[:n_eval]]
        train_set = [seqs[i] for i in sorted(order[n_eval:])]
        return train_set, eval_set

    def _replay_count(self, num_train: int, available: int) -> int:
        ratio = self.config.replay_ratio
        if ratio <= 0 or available == 0:
            return 0
        if ratio >= 1:
            return available
        return min(available, round(ratio * num_train / (1 - ratio)))

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
        epochs = cfg.num_epochs if num_epochs is None else num_epochs
        lr = cfg.learning_rate if learning_rate is None else learning_rate
        if len(training_examples) < cfg.min_examples:
            raise ValueError(
                f"Not enough training examples: have {len(training_examples)}, need at "
                f"least {cfg.min_examples} (training.min_examples)"
            )

        seqs, train_ids = self._prepare_all(training_examples, "training examples")
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
        replay_seqs, _ = self._prepare_all(replay_examples, "replay examples")

        rng = np.random.default_rng(cfg.seed)
        mx.random.seed(cfg.seed)
        train_set, eval_set = self._split(seqs, rng)
        # Past examples are held out too, so that the best checkpoint (and the
        # promotion gate) also answers "did it forget what it knew?".
        replay_seqs, replay_eval = self._split(replay_seqs, rng)
        eval_set += replay_eval
        num_replay = self._replay_count(len(train_set), len(replay_seqs))
        top_k = self._top_k(seqs + replay_seqs)
        bs = cfg.batch_size
        steps_per_epoch = -(-(len(train_set) + num_replay) // bs)

        snapshot = adapter_weights(self.model)
        try:
            return self._train_loop(
                train_set=train_set,
                eval_set=eval_set,
                replay_seqs=replay_seqs,
                num_replay=num_replay,
                top_k=top_k,
                epochs=epochs,
                learning_rate=float(lr),
                steps_per_epoch=steps_per_epoch,
                rng=rng,
                resume_from=resume_from,
                on_step=on_step,
                start=start,
            )
        except BaseException as e:
            self.model.update(tree_unflatten(list(snapshot.items())))
            self.model.eval()
            if isinstance(e, (RuntimeError, ValueError)) or not isinstance(
                e, Exception
            ):
                raise
            raise RuntimeError(f"LoRA training failed: {type(e).__name__}: {e}") from e

    def _train_loop(
        self,
        *,
        train_set: list[_Sequence],
        eval_set: list[_Sequence],
        replay_seqs: list[_Sequence],
        num_replay: int,
        top_k: int,
        epochs: int,
        learning_rate: float,
        steps_per_epoch: int,
        rng: np.random.Generator,
        resume_from: str | Path | Mapping[str, mx.array] | None,
        on_step: Callable[[int, float], None] | None,
        start: float,
    ) -> dict[str, Any]:
        cfg = self.config
        model = self.model
        if resume_from is not None:
            self._load_resume(resume_from)

        optimizer = optim.AdamW(learning_rate=learning_rate)
        optimizer.init(model.trainable_parameters())
        # Under mlx.launch the ranks train data-parallel: each takes its share
        # of every batch, and losses and gradients are averaged across ranks.
        group = mx.distributed.init()
        rank, size = group.rank(), group.size()
        # Stands in for a rank's share when a batch has fewer rows than ranks:
        # its masks are all zero, so it adds nothing to the loss.
        empty_row = _Sequence(np.zeros(2, np.int32), 2, np.zeros(0, np.int32), [], [])

        def rank_loss(model: nn.Module, *batch: mx.array) -> mx.array:
            # Normalised by the whole batch's counts, times size: the mean over
            # ranks is then the one-process batch loss however unevenly the
            # tokens fall between ranks (a mean of per-rank means is not).
            ce_sum, n_tok, kl_sum, n_dis = self._loss_sums(model, *batch)
            counts = mx.distributed.all_sum(mx.stop_gradient(mx.stack([n_tok, n_dis])))
            loss = ce_sum / mx.maximum(counts[0], 1.0)
            if cfg.distill_weight > 0:
                loss = loss + cfg.distill_weight * kl_sum / mx.maximum(counts[1], 1.0)
            return size * loss

        loss_and_grad = nn.value_and_grad(
            model, self._batch_loss if size == 1 else rank_loss
        )
        compiled_state = [model.state, optimizer.state, mx.random.state]

        def step(*batch: mx.array) -> mx.array:
            loss, grads = loss_and_grad(model, *batch)
            if size > 1:
                # Before clipping: the norm is the whole batch's gradient's.
                loss = mx.distributed.all_sum(loss) / size
                grads = nn.average_gradients(grads)
            if cfg.grad_clip is not None:
                grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
            optimizer.update(model, grads)
            return loss

        step_fn = mx.compile(step, inputs=compiled_state, outputs=compiled_state)

        initial_eval = self._evaluate(eval_set, top_k) if eval_set else None
        initial_match, eval_tokens = self._match_rate(eval_set) if eval_set else (None, 0)
        match = best_match = initial_match
        losses: list[float] = []
        eval_losses: list[float] = []
        best: float = math.inf
        score = math.inf
        train_loss = math.nan
        global_step = 0
        paths = {alias: self.checkpoint_dir / alias for alias in CHECKPOINT_ALIASES}

        bar = tqdm(
            total=epochs * steps_per_epoch,
            desc="LoRA training",
            unit="step",
            disable=not self.show_progress or rank != 0,
        )
        try:
            for epoch in range(1, epochs + 1):
                picks = rng.choice(len(replay_seqs), size=num_replay, replace=False)
                epoch_set = train_set + [replay_seqs[int(i)] for i in picks]
                order = rng.permutation(len(epoch_set))
                model.train()
                epoch_losses: list[float] = []
                for i in range(0, len(order), cfg.batch_size):
                    rows = order[i : i + cfg.batch_size][rank::size]
                    batch = self._batch(
                        [epoch_set[j] for j in rows] or [empty_row], top_k
                    )
                    loss_arr = step_fn(*batch)
                    mx.eval(loss_arr, model.state, optimizer.state)
                    loss = float(np.asarray(loss_arr))
                    global_step += 1
                    if not math.isfinite(loss):
                        raise RuntimeError(
                            f"LoRA training diverged: loss is {loss} at step {global_step} "
                            f"(epoch {epoch}); try a lower learning_rate (now "
                            f"{learning_rate:g}) or set training.grad_clip"
                        )
                    losses.append(loss)
                    epoch_losses.append(loss)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch)
                    if on_step is not None:
                        on_step(global_step, loss)
                train_loss = float(np.mean(epoch_losses))
                if eval_set:
                    score = self._evaluate(eval_set, top_k)
                    if not math.isfinite(score):
                        raise RuntimeError(
                            f"LoRA training diverged: eval loss is {score} after epoch "
                            f"{epoch}"
                        )
                    eval_losses.append(score)
                    match = self._match_rate(eval_set)[0]
                else:
                    score = train_loss
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
                    "step": global_step,
                    "epoch": epoch,
                    "num_epochs": epochs,
                    "learning_rate": learning_rate,
                    "train_loss": train_loss,
                    "eval_loss": score if eval_set else None,
                    "eval_match": match,
                    "best_loss": best,
                    "losses": list(losses),
                    "eval_losses": list(eval_losses),
                    "num_examples": len(train_set),
                    "num_eval": len(eval_set),
                    "num_replay": num_replay,
                    "resumed_from": (
                        None
                        if resume_from is None or isinstance(resume_from, Mapping)
                        else str(resume_from)
                    ),
                }
                # The ranks hold identical weights: one writer, and the other
                # ranks never touch checkpoint_dir.
                if rank == 0:
                    self._save("latest", state)
                    if improved:
                        self._save("best", state)
                    if epoch == epochs:
                        self._save("final", state)
        finally:
            bar.close()
            model.eval()

        return {
            "final_loss": score,
            "best_loss": best,
            "global_step": global_step,
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
            "num_examples": len(train_set),
            "num_eval": len(eval_set),
            "num_replay": num_replay,
            "elapsed_s": time.perf_counter() - start,
        }
