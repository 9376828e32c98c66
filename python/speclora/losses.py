"""Training losses: next-token cross-entropy, and distillation toward the target's
stored top-k distribution where draft and target disagreed."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import mlx.core as mx
from mlx import nn

from speclora.config import TrainingConfig

# Stands in for -inf on padded top-k slots: finite so 0 * it stays 0 in the
# gradient, small enough that exp() of it is exactly 0 in float32.
MASKED_LOGIT = -1e9


class Batch(NamedTuple):
    """Padded sequences, as :func:`loss_sums` reads them."""

    inputs: mx.array  # [B, T] int32
    targets: mx.array  # [B, T] int32, inputs shifted by one
    ce_mask: mx.array  # [B, T] float32, 1 where the target is an output token
    topk_ids: mx.array  # [B, T, K] int32, target's top-k ids at disagreements
    target_p: mx.array  # [B, T, K] float32, 0 on padded slots
    target_logp: mx.array  # [B, T, K] float32, 0 on padded slots
    topk_valid: mx.array  # [B, T, K] bool
    distill_mask: mx.array  # [B, T] float32, 1 at disagreements


def cross_entropy(
    logits: mx.array,  # [B, T, V]
    targets: mx.array,  # [B, T] int32
) -> mx.array:  # [B, T] float32
    """Next-token cross-entropy at every position, computed in float32."""
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets)


def topk_kl(
    logits: mx.array,  # [B, T, V] float32
    batch: Batch,
    inv_temperature: float,
) -> mx.array:  # [B, T] float32
    """Forward KL(p_target_topk || q_draft_topk) at every position."""
    z = mx.take_along_axis(logits, batch.topk_ids, axis=-1) * inv_temperature
    z = mx.where(batch.topk_valid, z, MASKED_LOGIT)
    # Softmax over the k slots == the draft's softmax renormalised over them.
    log_q = z - mx.logsumexp(z, axis=-1, keepdims=True)
    return (batch.target_p * (batch.target_logp - log_q)).sum(axis=-1)


def loss_sums(
    logits: mx.array,  # [B, T, V] float32
    batch: Batch,
    config: TrainingConfig,
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """CE sum, CE token count, KL sum, disagreement count (scalars)."""
    ce = cross_entropy(logits, batch.targets) * batch.ce_mask
    kl = topk_kl(logits, batch, 1.0 / config.distill_temperature)
    mask = batch.distill_mask
    return ce.sum(), batch.ce_mask.sum(), (kl * mask).sum(), mask.sum()


def draft_loss(
    config: TrainingConfig, group: mx.distributed.Group | None = None
) -> Callable[..., mx.array]:
    """``loss(model, *batch)``: CE mean over output tokens + ``distill_weight`` *
    KL mean over disagreements, for ``nn.value_and_grad``.

    With a ``group`` of ranks, each on its share of the batch, the means are
    over the whole batch and the loss is scaled by the number of ranks.
    """
    size = 1 if group is None else group.size()

    def loss(model: nn.Module, *arrays: mx.array) -> mx.array:
        batch = Batch(*arrays)
        logits = model(batch.inputs).astype(mx.float32)
        ce_sum, n_tok, kl_sum, n_dis = loss_sums(logits, batch, config)
        if size > 1:
            # The mean over ranks is then the one-process batch loss however
            # unevenly the tokens fall between ranks (a mean of means is not).
            counts = mx.stop_gradient(mx.stack([n_tok, n_dis]))
            n_tok, n_dis = mx.distributed.all_sum(counts, group=group)
        total = ce_sum / mx.maximum(n_tok, 1.0)
        if config.distill_weight > 0:
            total = total + config.distill_weight * kl_sum / mx.maximum(n_dis, 1.0)
        return size * total if size > 1 else total

    return loss
