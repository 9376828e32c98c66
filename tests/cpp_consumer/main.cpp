// Greedy acceptance and a ring write on known inputs; exits non-zero on any
// mismatch.

#include <cstdint>
#include <iostream>
#include <vector>

#include "mlx/mlx.h"
#include "speclora/speclora.h"

namespace mx = mlx::core;

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::cerr << "mismatch: " << what << "\n";
    ++failures;
  }
}

}  // namespace

int main() {
  // Two rows, K = 3 drafts, V = 6. The target's argmax at each position:
  // row 0 agrees with every draft (bonus 5), row 1 disagrees at position 1.
  constexpr int B = 2, K = 3, V = 6;
  const int drafts[B][K] = {{1, 2, 3}, {4, 0, 2}};
  const int target_argmax[B][K + 1] = {{1, 2, 3, 5}, {4, 3, 2, 1}};
  std::vector<float> target(B * (K + 1) * V, 0.0f);
  std::vector<int32_t> draft_ids;
  for (int b = 0; b < B; ++b) {
    for (int i = 0; i <= K; ++i) {
      target[(b * (K + 1) + i) * V + target_argmax[b][i]] = 4.0f;
    }
    for (int i = 0; i < K; ++i) {
      draft_ids.push_back(drafts[b][i]);
    }
  }
  auto out = speclora::speculative_accept(
      mx::array(draft_ids.begin(), {B, K}, mx::int32),
      mx::zeros({B, K, V}),
      mx::array(target.begin(), {B, K + 1, V}, mx::float32),
      mx::zeros({B, K + 1}),
      /* temperature = */ 0.0f,
      mx::Device::cpu);
  mx::eval(out);
  const int32_t* n = out[0].data<int32_t>();
  const int32_t* tokens = out[1].data<int32_t>();
  const int32_t expected_tokens[B][K + 1] = {{1, 2, 3, 5}, {4, 3, -1, -1}};
  expect(n[0] == 3 && n[1] == 1, "num_accepted");
  for (int b = 0; b < B; ++b) {
    for (int i = 0; i <= K; ++i) {
      expect(tokens[b * (K + 1) + i] == expected_tokens[b][i], "tokens");
    }
  }

  // Ring of 4 slots, slot 0 kept: positions 3, 4, 5 land in slots 3, 1, 2.
  auto ring = speclora::kv_ring_write(
      mx::zeros({1, 1, 4, 1}),
      mx::array({1.0f, 2.0f, 3.0f}, {1, 1, 3, 1}),
      mx::array({3}),
      /* keep = */ 1,
      /* capacity = */ 4,
      mx::Device::cpu);
  mx::eval(ring);
  const float* slots = ring.data<float>();
  expect(
      slots[0] == 0 && slots[1] == 2 && slots[2] == 3 && slots[3] == 1, "ring");

  bool threw = false;
  try {
    speclora::speculative_accept(
        mx::zeros({B, K}, mx::float32),
        mx::zeros({B, K, V}),
        mx::zeros({B, K + 1, V}),
        mx::zeros({B, K + 1}),
        0.0f);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  expect(threw, "invalid_argument on float draft tokens");

  if (failures == 0) {
    std::cout << "speclora consumer: ok\n";
  }
  return failures == 0 ? 0 : 1;
}
