// Per-row writes into a rotating key/value buffer, the storage half of a KV
// cache that can be rolled back in every state.

#pragma once

#include "mlx/array.h"
#include "mlx/utils.h"

#include "speclora/export.h"

namespace speclora {

namespace mx = mlx::core;

/**
 * Slot that absolute position ``position`` occupies in a buffer whose first
 * ``keep`` slots are fixed and whose other ``capacity - keep`` slots rotate.
 * ``capacity == 0`` means the buffer never rotates (the slot is the position).
 */
inline int64_t kv_slot(int64_t position, int keep, int capacity) {
  if (capacity == 0 || position < keep) {
    return position;
  }
  return keep + (position - keep) % (capacity - keep);
}

/**
 * Write ``update[b, :, i]`` into the slot of position ``start[b] + i`` of row
 * ``b``, for every row at its own position.
 *
 * When one call writes more positions than the rotating part holds, the later
 * position wins. Positions below zero or whose slot is past the buffer length
 * ``L`` are skipped. The buffer is updated in place when MLX can donate it
 * (nothing else holds it), so a write costs O(B * H * S * D), not O(L).
 *
 * @return the buffer after the write, ``[B, H, L, D]`` in ``cache``'s dtype.
 * @throws std::invalid_argument on bad ranks, shapes, dtypes, ``keep`` or
 *   ``capacity``, with a message starting ``[kv_ring_write]``.
 */
SPECLORA_API mx::array kv_ring_write(
    const mx::array& cache,   // [B, H, L, D]
    const mx::array& update,  // [B, H, S, D]
    const mx::array& start,   // [B] integer, position of update[:, :, 0]
    int keep,
    int capacity,
    mx::StreamOrDevice s = {});

}  // namespace speclora
