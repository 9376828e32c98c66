// nanobind module speclora._ext. Built in nanobind's "mlx" domain so that
// mlx.core's array, Stream and Device types are shared with it; mlx.core must
// be imported before this module.

#include <nanobind/nanobind.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>

#include "speclora/speclora.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

NB_MODULE(_ext, m) {
  // The bound signatures use mlx.core's types: make sure they are registered.
  nb::module_::import_("mlx.core");
  m.doc() = "Native MLX ops of speclora (CPU kernels).";
  m.attr("PLACEHOLDER") = speclora::kPlaceholder;

  m.def(
      "speculative_accept",
      [](const mx::array& draft_tokens,
         const mx::array& draft_logits,
         const mx::array& target_logits,
         const mx::array& uniforms,
         float temperature,
         mx::StreamOrDevice s) {
        auto out = speclora::speculative_accept(
            draft_tokens,
            draft_logits,
            target_logits,
            uniforms,
            temperature,
            s);
        return std::make_tuple(out[0], out[1]);
      },
      "draft_tokens"_a,
      "draft_logits"_a,
      "target_logits"_a,
      "uniforms"_a,
      "temperature"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      R"(Fused acceptance of drafted tokens (CPU streams only).

        Args:
            draft_tokens (array): ``[B, K]`` integer drafted ids.
            draft_logits (array): ``[B, K, V]`` draft logits.
            target_logits (array): ``[B, K+1, V]`` target logits.
            uniforms (array): ``[B, K+1]`` uniforms in ``[0, 1)``.
            temperature (float): ``0`` for greedy matching.

        Returns:
            tuple(array, array): ``num_accepted [B]`` and ``tokens [B, K+1]``
            (int32, padded with ``PLACEHOLDER``).
      )");

  m.def(
      "check_speculative_accept_inputs",
      &speclora::check_speculative_accept_inputs,
      "draft_tokens"_a,
      "draft_logits"_a,
      "target_logits"_a,
      "uniforms"_a,
      "temperature"_a,
      "Raise ValueError where speculative_accept would; reads no array data.");

  m.def(
      "kv_ring_write",
      &speclora::kv_ring_write,
      "cache"_a,
      "update"_a,
      "start"_a,
      nb::kw_only(),
      "keep"_a,
      "capacity"_a,
      "stream"_a = nb::none(),
      R"(Write ``update`` into a rotating KV buffer, each row at its own position.

        Args:
            cache (array): ``[B, H, L, D]`` buffer.
            update (array): ``[B, H, S, D]`` new keys or values.
            start (array): ``[B]`` integer position of ``update[:, :, 0]``.
            keep (int): Leading slots that never rotate.
            capacity (int): Slots of the full ring, ``0`` for no rotation.

        Returns:
            array: The buffer after the write, ``[B, H, L, D]``.
      )");
}
