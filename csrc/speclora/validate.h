// Helpers for the "[op] what is wrong, with the value" error messages.

#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

#include "mlx/array.h"
#include "mlx/utils.h"

namespace speclora::detail {

/** Any streamable value (dtype, device, number) as text. */
template <typename T>
std::string str(const T& value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

/** A shape as ``[2, 3, 100]``. */
inline std::string str(const mlx::core::Shape& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(shape[i]);
  }
  return out + "]";
}

[[noreturn]] inline void fail(const char* op, const std::string& what) {
  throw std::invalid_argument("[" + std::string(op) + "] " + what);
}

}  // namespace speclora::detail
