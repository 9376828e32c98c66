// kv_ring_write: validation, graph node and the CPU kernel.

#include <cstring>
#include <limits>
#include <memory>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"

#include "speclora/kv_cache.h"
#include "speclora/primitives.h"
#include "speclora/validate.h"

namespace speclora {

namespace {

constexpr const char* kOp = "kv_ring_write";

// Copies `a` into the row-contiguous buffer `dst`, whatever its strides.
template <typename T>
void copy_to_contiguous(const mx::array& a, T* dst) {
  const auto& sh = a.shape();
  const auto& st = a.strides();
  const T* src = a.data<T>();
  for (int b = 0; b < sh[0]; ++b) {
    for (int h = 0; h < sh[1]; ++h) {
      for (int l = 0; l < sh[2]; ++l) {
        const T* s = src + b * st[0] + h * st[1] + l * st[2];
        for (int d = 0; d < sh[3]; ++d) {
          *dst++ = s[d * st[3]];
        }
      }
    }
  }
}

// Elements are moved as raw bits of their width: the update already has the
// buffer's dtype, so no conversion happens here.
template <typename T>
void ring_write(
    const mx::array& cache,   // [B, H, L, D]
    const mx::array& update,  // [B, H, S, D]
    const mx::array& start,   // [B] int64
    T* out,                   // [B, H, L, D] row-contiguous
    bool in_place,
    int keep,
    int capacity) {
  if (!in_place) {
    copy_to_contiguous<T>(cache, out);
  }
  const int B = cache.shape(0);
  const int H = cache.shape(1);
  const int L = cache.shape(2);
  const int D = cache.shape(3);
  const int S = update.shape(2);
  const auto& us = update.strides();
  const T* src = update.data<T>();
  const int64_t* starts = start.data<int64_t>();
  const int64_t start_stride = start.strides()[0];
  for (int b = 0; b < B; ++b) {
    const int64_t first = starts[b * start_stride];
    for (int i = 0; i < S; ++i) {
      if (first > std::numeric_limits<int64_t>::max() - i) {
        break;  // positions past int64 cannot exist: skipped like any other
      }
      const int64_t position = first + i;
      if (position < 0) {
        continue;
      }
      const int64_t slot = kv_slot(position, keep, capacity);
      if (slot >= L) {
        continue;
      }
      for (int h = 0; h < H; ++h) {
        T* dst = out + ((static_cast<int64_t>(b) * H + h) * L + slot) * D;
        const T* s = src + b * us[0] + h * us[1] + i * us[2];
        if (us[3] == 1) {
          std::memcpy(dst, s, sizeof(T) * D);
        } else {
          for (int d = 0; d < D; ++d) {
            dst[d] = s[d * us[3]];
          }
        }
      }
    }
  }
}

}  // namespace

mx::array kv_ring_write(
    const mx::array& cache,
    const mx::array& update,
    const mx::array& start,
    int keep,
    int capacity,
    mx::StreamOrDevice s) {
  using detail::fail;
  using detail::str;

  if (cache.ndim() != 4) {
    fail(
        kOp,
        "cache must have shape [B, H, L, D], got " + str(cache.shape()) + ".");
  }
  if (update.ndim() != 4) {
    fail(
        kOp,
        "update must have shape [B, H, S, D], got " + str(update.shape()) +
            ".");
  }
  if (update.shape(0) != cache.shape(0) || update.shape(1) != cache.shape(1) ||
      update.shape(3) != cache.shape(3)) {
    fail(
        kOp,
        "update " + str(update.shape()) + " does not match cache " +
            str(cache.shape()) + " in B, H, D.");
  }
  if (start.ndim() != 1 || start.shape(0) != cache.shape(0)) {
    fail(
        kOp,
        "start must have shape [B] = " + str(mx::Shape{cache.shape(0)}) +
            ", got " + str(start.shape()) + ".");
  }
  if (!mx::issubdtype(start.dtype(), mx::integer)) {
    fail(
        kOp,
        "start must have an integer dtype, got " + str(start.dtype()) + ".");
  }
  if (keep < 0) {
    fail(kOp, "keep must be >= 0, got " + str(keep) + ".");
  }
  if (capacity < 0 || (capacity > 0 && capacity <= keep)) {
    fail(
        kOp,
        "capacity must be 0 (no rotation) or greater than keep = " + str(keep) +
            ", got " + str(capacity) + ".");
  }
  auto stream = mx::to_stream(s);
  if (stream.device.type != mx::Device::cpu) {
    fail(
        kOp,
        "has a CPU kernel only; got a stream on " + str(stream.device) +
            " (use the MLX-op reference in speclora.cache there).");
  }
  // Positions are int64: one beyond int32 must not wrap into the buffer, and
  // uint64 values past the int64 range saturate rather than turn negative.
  auto start64 = start.dtype() == mx::uint64
      ? mx::minimum(
            start,
            mx::array(std::numeric_limits<int64_t>::max(), mx::uint64),
            stream)
      : start;
  return mx::array(
      cache.shape(),
      cache.dtype(),
      std::make_shared<KVRingWrite>(stream, keep, capacity),
      {cache,
       mx::astype(update, cache.dtype(), stream),
       mx::astype(start64, mx::int64, stream)});
}

void KVRingWrite::eval_cpu(
    const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& cache = inputs[0];
  // Reuse the buffer when nothing else holds it: that is what makes a write
  // cost O(S) rather than a copy of the whole cache.
  const bool in_place = cache.flags().row_contiguous && cache.is_donatable();
  if (in_place) {
    out.copy_shared_buffer(cache);
  } else {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) {
    encoder.set_input_array(in);
  }
  encoder.set_output_array(out);
  encoder.dispatch([cache = mx::array::unsafe_weak_copy(inputs[0]),
                    update = mx::array::unsafe_weak_copy(inputs[1]),
                    start = mx::array::unsafe_weak_copy(inputs[2]),
                    out = mx::array::unsafe_weak_copy(out),
                    in_place,
                    keep = keep_,
                    capacity = capacity_]() mutable {
    switch (out.itemsize()) {
      case 1:
        return ring_write<uint8_t>(
            cache,
            update,
            start,
            out.data<uint8_t>(),
            in_place,
            keep,
            capacity);
      case 2:
        return ring_write<uint16_t>(
            cache,
            update,
            start,
            out.data<uint16_t>(),
            in_place,
            keep,
            capacity);
      case 4:
        return ring_write<uint32_t>(
            cache,
            update,
            start,
            out.data<uint32_t>(),
            in_place,
            keep,
            capacity);
      default:
        return ring_write<uint64_t>(
            cache,
            update,
            start,
            out.data<uint64_t>(),
            in_place,
            keep,
            capacity);
    }
  });
}

void KVRingWrite::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "[kv_ring_write] has no GPU kernel; use the MLX-op reference.");
}

bool KVRingWrite::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const KVRingWrite&>(other);
  return keep_ == o.keep_ && capacity_ == o.capacity_;
}

std::vector<mx::Shape> KVRingWrite::output_shapes(
    const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

}  // namespace speclora
