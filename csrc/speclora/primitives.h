// The MLX primitives behind the public ops. Each holds only scalar state; the
// free functions in the public headers validate inputs and build the graph
// node.

#pragma once

#include <vector>

#include "mlx/primitives.h"

namespace speclora {

namespace mx = mlx::core;

class SpeculativeAccept : public mx::Primitive {
 public:
  SpeculativeAccept(mx::Stream stream, float temperature)
      : mx::Primitive(stream), temperature_(temperature) {}

  void eval_cpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  void eval_gpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;

  const char* name() const override {
    return "SpeculativeAccept";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;

 private:
  float temperature_;
};

class KVRingWrite : public mx::UnaryPrimitive {
 public:
  KVRingWrite(mx::Stream stream, int keep, int capacity)
      : mx::UnaryPrimitive(stream), keep_(keep), capacity_(capacity) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override {
    return "KVRingWrite";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;

 private:
  int keep_;
  int capacity_;
};

}  // namespace speclora
