// Speculative-decoding acceptance as one MLX op.

#pragma once

#include <cstdint>
#include <vector>

#include "mlx/array.h"
#include "mlx/utils.h"

#include "speclora/export.h"

namespace speclora {

namespace mx = mlx::core;

/** Fills ``tokens`` after the last emitted token of a row. */
inline constexpr int32_t kPlaceholder = -1;

/**
 * Decide which drafted tokens the target accepts and which token follows them.
 *
 * At ``temperature == 0`` a draft survives while it equals the target's argmax
 * (lowest index on ties) and the next token is the target's argmax where the
 * first mismatch happened, or at position ``K`` when all ``K`` survived.
 *
 * At ``temperature > 0`` this is the rejection sampling of Leviathan et al. and
 * Chen et al. on ``p = softmax(target / T)`` and ``q = softmax(draft / T)``:
 * draft ``x_i`` is accepted iff ``u[i] * q(x_i) < p(x_i)``; at the first
 * rejection the next token is drawn from ``max(p - q, 0)`` (from ``p`` if that
 * is zero everywhere) and after ``K`` acceptances from ``p`` at position ``K``,
 * in both cases by inverse CDF with ``u[K]``. Every probability is computed in
 * float32, with sums accumulated in index order, so the result equals the
 * composition of MLX ops in ``speclora.acceptance`` bit for bit.
 *
 * Draft ids outside ``[0, V)`` are rejected, never read out of bounds.
 * Runs on CPU streams only; evaluation on a GPU stream throws.
 *
 * @return ``{num_accepted [B] int32, tokens [B, K+1] int32}``: tokens holds the
 *   accepted drafts, then the correction or bonus token, then ``kPlaceholder``.
 * @throws std::invalid_argument on bad ranks, shapes, dtypes or temperature,
 *   with a message starting ``[speculative_accept]``.
 */
SPECLORA_API std::vector<mx::array> speculative_accept(
    const mx::array& draft_tokens,   // [B, K] integer
    const mx::array& draft_logits,   // [B, K, V] float
    const mx::array& target_logits,  // [B, K+1, V] float
    const mx::array& uniforms,       // [B, K+1] float in [0, 1)
    float temperature,
    mx::StreamOrDevice s = {});

/**
 * The checks ``speculative_accept`` runs before it builds its graph node, for
 * callers that compute the same result another way (the MLX-op reference on a
 * GPU stream). Reads no array data.
 *
 * @throws std::invalid_argument as ``speculative_accept`` does.
 */
SPECLORA_API void check_speculative_accept_inputs(
    const mx::array& draft_tokens,   // [B, K] integer
    const mx::array& draft_logits,   // [B, K, V] float
    const mx::array& target_logits,  // [B, K+1, V] float
    const mx::array& uniforms,       // [B, K+1] float
    float temperature);

}  // namespace speclora
