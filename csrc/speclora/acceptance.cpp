// speculative_accept: validation, graph node and the fused CPU kernel.
//
// The kernel is written to give the same float32 results as the composition of
// MLX ops in python/speclora/acceptance.py: logits are scaled by the float32
// reciprocal of the temperature, exponentials use MLX's own CPU exp, and every
// sum is accumulated in index order (as mx.cumsum does), so the two agree bit
// for bit on the same uniforms.

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/backend/cpu/simd/simd.h"
#include "mlx/ops.h"

#include "speclora/acceptance.h"
#include "speclora/primitives.h"
#include "speclora/validate.h"

namespace speclora {

namespace {

constexpr const char* kOp = "speculative_accept";
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

bool is_logits_dtype(mx::Dtype t) {
  return t == mx::float32 || t == mx::float16 || t == mx::bfloat16;
}

// One vocabulary row of a [B, N, V] logits array, read through its strides so
// that sliced or broadcast inputs need no copy.
template <typename T>
struct Row {
  const T* data;
  int64_t stride;
  int size;

  float operator[](int v) const {
    return static_cast<float>(data[v * stride]);
  }
};

template <typename T>
Row<T> row_of(const mx::array& a, int b, int i) {
  const auto& st = a.strides();
  return {a.data<T>() + b * st[0] + i * st[1], st[2], a.shape(2)};
}

// The same exp as mx.exp on the CPU.
inline float exp_f32(float x) {
  return mx::simd::exp(mx::simd::Simd<float, 1>(x)).value;
}

// First index of the maximum; NaN counts as the maximum, as in mx.argmax.
template <typename T>
int argmax_row(const Row<T>& row) {
  float best = row[0];
  int index = 0;
  for (int v = 1; v < row.size; ++v) {
    float x = row[v];
    if (x > best || (std::isnan(x) && !std::isnan(best))) {
      best = x;
      index = v;
    }
  }
  return index;
}

// The exponentials dominate sampling. On x86-64 Linux they also get an AVX2+FMA
// clone, picked at load time: std::fma is correctly rounded with or without the
// instruction and every other step is elementwise, so both clones return the
// same bits as MLX's own (baseline x86-64) exp.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && \
    !defined(__clang__)
#define SPECLORA_FAST_CLONES \
  __attribute__((target_clones("default", "arch=x86-64-v3"), flatten))
#else
#define SPECLORA_FAST_CLONES
#endif

SPECLORA_FAST_CLONES
void exp_shifted(const float* x, float shift, float* e, int size) {
  for (int v = 0; v < size; ++v) {
    e[v] = exp_f32(x[v] - shift);
  }
}

// Writes exp(logits * inv_temp - max) to `e` and returns their sum in index
// order; a row with no finite logit gives zeros and a zero sum. `x` is scratch
// of the row's size.
template <typename T>
float softmax_numerators(
    const Row<T>& row, float inv_temp, float* x, float* e) {
  float m = kNegInf;
  for (int v = 0; v < row.size; ++v) {
    x[v] = row[v] * inv_temp;
    m = std::max(m, x[v]);
  }
  float sum = 0.0f;
  if (m == kNegInf) {
    std::fill(e, e + row.size, 0.0f);
    return sum;
  }
  exp_shifted(x, m, e, row.size);
  for (int v = 0; v < row.size; ++v) {
    sum += e[v];
  }
  return sum;
}

inline float normalized(float e, float sum) {
  return sum > 0.0f ? e / sum : 0.0f;
}

// Inverse-CDF draw from unnormalized weights `w` whose index-order sum is
// `total`: the first index whose running sum exceeds u * total. Rounding can
// leave none, then the last index with positive weight; with no positive
// weight at all, 0.
int sample_weights(const float* w, int size, float total, float u) {
  float threshold = u * total;
  float running = 0.0f;
  int last_positive = -1;
  for (int v = 0; v < size; ++v) {
    running += w[v];
    if (w[v] > 0.0f) {
      last_positive = v;
    }
    if (running > threshold) {
      return v;
    }
  }
  return last_positive >= 0 ? last_positive : 0;
}

template <typename TD, typename TT>
void accept_rows(
    const mx::array& draft_tokens,   // [B, K] int64
    const mx::array& draft_logits,   // [B, K, V]
    const mx::array& target_logits,  // [B, K+1, V]
    const mx::array& uniforms,       // [B, K+1] float32
    float temperature,
    int32_t* num_accepted,  // [B]
    int32_t* tokens) {      // [B, K+1]
  const int B = draft_tokens.shape(0);
  const int K = draft_tokens.shape(1);
  const int V = target_logits.shape(2);
  const int64_t* draft = draft_tokens.data<int64_t>();
  const auto& dts = draft_tokens.strides();
  const float* u = uniforms.data<float>();
  const auto& us = uniforms.strides();
  const bool greedy = temperature == 0.0f;
  const float inv_temp = greedy ? 0.0f : 1.0f / temperature;

  // Softmax numerators of the current target (p) and draft (q) rows; the draft
  // buffer is reused for the residual max(p - q, 0) on rejection.
  std::vector<float> ep(greedy ? 0 : V);
  std::vector<float> eq(greedy ? 0 : V);
  std::vector<float> scaled(greedy ? 0 : V);

  for (int b = 0; b < B; ++b) {
    const float u_last = u[b * us[0] + K * us[1]];
    int n = 0;
    int next = 0;
    bool rejected = false;
    for (; n < K; ++n) {
      const int64_t x = draft[b * dts[0] + n * dts[1]];
      const bool in_vocab = x >= 0 && x < V;
      auto target_row = row_of<TT>(target_logits, b, n);
      if (greedy) {
        int best = argmax_row(target_row);
        if (!in_vocab || best != x) {
          next = best;
          rejected = true;
          break;
        }
        continue;
      }
      float sp =
          softmax_numerators(target_row, inv_temp, scaled.data(), ep.data());
      float sq = softmax_numerators(
          row_of<TD>(draft_logits, b, n), inv_temp, scaled.data(), eq.data());
      float px = in_vocab ? normalized(ep[x], sp) : 0.0f;
      float qx = in_vocab ? normalized(eq[x], sq) : 0.0f;
      if (in_vocab && u[b * us[0] + n * us[1]] * qx < px) {
        continue;
      }
      float residual_sum = 0.0f;
      for (int v = 0; v < V; ++v) {
        eq[v] = std::max(normalized(ep[v], sp) - normalized(eq[v], sq), 0.0f);
        residual_sum += eq[v];
      }
      next = residual_sum > 0.0f
                 ? sample_weights(eq.data(), V, residual_sum, u_last)
                 : sample_weights(ep.data(), V, sp, u_last);
      rejected = true;
      break;
    }
    if (!rejected) {
      auto bonus_row = row_of<TT>(target_logits, b, K);
      if (greedy) {
        next = argmax_row(bonus_row);
      } else {
        float sp =
            softmax_numerators(bonus_row, inv_temp, scaled.data(), ep.data());
        next = sample_weights(ep.data(), V, sp, u_last);
      }
    }
    int32_t* out = tokens + static_cast<int64_t>(b) * (K + 1);
    for (int i = 0; i < n; ++i) {
      // Accepted drafts lie in [0, V): they fit the int32 output.
      out[i] = static_cast<int32_t>(draft[b * dts[0] + i * dts[1]]);
    }
    out[n] = next;
    std::fill(out + n + 1, out + K + 1, kPlaceholder);
    num_accepted[b] = n;
  }
}

template <typename TD>
void dispatch_target(
    const std::vector<mx::array>& in,
    float temperature,
    int32_t* num_accepted,
    int32_t* tokens) {
  switch (in[2].dtype()) {
    case mx::float32:
      return accept_rows<TD, float>(
          in[0], in[1], in[2], in[3], temperature, num_accepted, tokens);
    case mx::float16:
      return accept_rows<TD, mx::float16_t>(
          in[0], in[1], in[2], in[3], temperature, num_accepted, tokens);
    default:
      return accept_rows<TD, mx::bfloat16_t>(
          in[0], in[1], in[2], in[3], temperature, num_accepted, tokens);
  }
}

}  // namespace

void check_speculative_accept_inputs(
    const mx::array& draft_tokens,
    const mx::array& draft_logits,
    const mx::array& target_logits,
    const mx::array& uniforms,
    float temperature) {
  using detail::fail;
  using detail::str;

  if (draft_tokens.ndim() != 2) {
    fail(
        kOp,
        "draft_tokens must have shape [B, K], got " +
            str(draft_tokens.shape()) + ".");
  }
  if (draft_logits.ndim() != 3) {
    fail(
        kOp,
        "draft_logits must have shape [B, K, V], got " +
            str(draft_logits.shape()) + ".");
  }
  if (target_logits.ndim() != 3) {
    fail(
        kOp,
        "target_logits must have shape [B, K+1, V], got " +
            str(target_logits.shape()) + ".");
  }
  if (uniforms.ndim() != 2) {
    fail(
        kOp,
        "uniforms must have shape [B, K+1], got " + str(uniforms.shape()) +
            ".");
  }
  const int B = draft_tokens.shape(0);
  const int K = draft_tokens.shape(1);
  const int V = target_logits.shape(2);
  if (draft_logits.shape(0) != B || draft_logits.shape(1) != K) {
    fail(
        kOp,
        "draft_logits " + str(draft_logits.shape()) +
            " does not match draft_tokens " + str(draft_tokens.shape()) +
            " in B, K.");
  }
  if (target_logits.shape(0) != B || target_logits.shape(1) != K + 1) {
    fail(
        kOp,
        "target_logits " + str(target_logits.shape()) +
            " must be [B, K+1, V] = [" + str(B) + ", " + str(K + 1) +
            ", V] for draft_tokens " + str(draft_tokens.shape()) + ".");
  }
  if (draft_logits.shape(2) != V) {
    fail(
        kOp,
        "draft_logits " + str(draft_logits.shape()) + " and target_logits " +
            str(target_logits.shape()) + " disagree on the vocabulary size V.");
  }
  if (V < 1) {
    fail(kOp, "the vocabulary size V must be at least 1, got " + str(V) + ".");
  }
  if (uniforms.shape(0) != B || uniforms.shape(1) != K + 1) {
    fail(
        kOp,
        "uniforms " + str(uniforms.shape()) +
            " must be [B, K+1] = " + str(mx::Shape{B, K + 1}) + ".");
  }
  if (!mx::issubdtype(draft_tokens.dtype(), mx::integer)) {
    fail(
        kOp,
        "draft_tokens must have an integer dtype, got " +
            str(draft_tokens.dtype()) + ".");
  }
  if (!is_logits_dtype(draft_logits.dtype())) {
    fail(
        kOp,
        "draft_logits must be float32, float16 or bfloat16, got " +
            str(draft_logits.dtype()) + ".");
  }
  if (!is_logits_dtype(target_logits.dtype())) {
    fail(
        kOp,
        "target_logits must be float32, float16 or bfloat16, got " +
            str(target_logits.dtype()) + ".");
  }
  if (!mx::issubdtype(uniforms.dtype(), mx::floating)) {
    fail(
        kOp,
        "uniforms must have a floating dtype, got " + str(uniforms.dtype()) +
            ".");
  }
  if (!(temperature >= 0.0f) || std::isinf(temperature)) {
    fail(
        kOp,
        "temperature must be finite and >= 0, got " + str(temperature) + ".");
  }
}

std::vector<mx::array> speculative_accept(
    const mx::array& draft_tokens,
    const mx::array& draft_logits,
    const mx::array& target_logits,
    const mx::array& uniforms,
    float temperature,
    mx::StreamOrDevice s) {
  check_speculative_accept_inputs(
      draft_tokens, draft_logits, target_logits, uniforms, temperature);
  const int B = draft_tokens.shape(0);
  const int K = draft_tokens.shape(1);
  auto stream = mx::to_stream(s);
  if (stream.device.type != mx::Device::cpu) {
    detail::fail(
        kOp,
        "has a CPU kernel only; got a stream on " + detail::str(stream.device) +
            " (use the MLX-op reference in speclora.acceptance there).");
  }
  return mx::array::make_arrays(
      {mx::Shape{B}, mx::Shape{B, K + 1}},
      {mx::int32, mx::int32},
      std::make_shared<SpeculativeAccept>(stream, temperature),
      // int64 holds every integer id exactly (uint64 beyond it turns negative),
      // so an out-of-range id can never wrap into [0, V) and be accepted.
      {mx::astype(draft_tokens, mx::int64, stream),
       draft_logits,
       target_logits,
       mx::astype(uniforms, mx::float32, stream)});
}

void SpeculativeAccept::eval_cpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& num_accepted = outputs[0];
  auto& tokens = outputs[1];
  num_accepted.set_data(mx::allocator::malloc(num_accepted.nbytes()));
  tokens.set_data(mx::allocator::malloc(tokens.nbytes()));

  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) {
    encoder.set_input_array(in);
  }
  encoder.set_output_array(num_accepted);
  encoder.set_output_array(tokens);
  encoder.dispatch([in =
                        std::vector<mx::array>{
                            mx::array::unsafe_weak_copy(inputs[0]),
                            mx::array::unsafe_weak_copy(inputs[1]),
                            mx::array::unsafe_weak_copy(inputs[2]),
                            mx::array::unsafe_weak_copy(inputs[3])},
                    num_accepted = num_accepted.data<int32_t>(),
                    tokens = tokens.data<int32_t>(),
                    temperature = temperature_]() {
    switch (in[1].dtype()) {
      case mx::float32:
        return dispatch_target<float>(in, temperature, num_accepted, tokens);
      case mx::float16:
        return dispatch_target<mx::float16_t>(
            in, temperature, num_accepted, tokens);
      default:
        return dispatch_target<mx::bfloat16_t>(
            in, temperature, num_accepted, tokens);
    }
  });
}

void SpeculativeAccept::eval_gpu(
    const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "[speculative_accept] has no GPU kernel; use the MLX-op reference.");
}

bool SpeculativeAccept::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const SpeculativeAccept&>(other);
  return temperature_ == o.temperature_;
}

std::vector<mx::Shape> SpeculativeAccept::output_shapes(
    const std::vector<mx::array>& inputs) {
  const auto& draft_tokens = inputs[0];
  int B = draft_tokens.shape(0);
  int K = draft_tokens.shape(1);
  return {mx::Shape{B}, mx::Shape{B, K + 1}};
}

}  // namespace speclora
