// What the two parts of the oneDNN extension share (onednn_conv.cc: inference, onednn_train.cc:
// training): one CPU engine for the process, a stream per thread, and per-thread scratch buffers.
#pragma once

#include <oneapi/dnnl/dnnl.hpp>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace rsjax_onednn {

inline dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

inline dnnl::stream& Stream() {
  thread_local dnnl::stream s(Engine());
  return s;
}

// Per-thread buffer `which` (0: a primitive's scratchpad, 1: reordered weights) of at least `bytes`;
// the two never alias, and a primitive runs to completion on its thread before the buffer is reused.
inline std::vector<uint8_t>& Scratch(size_t bytes, int which) {
  thread_local std::vector<uint8_t> buf[2];
  if (buf[which].size() < bytes) buf[which].resize(bytes);
  return buf[which];
}

}  // namespace rsjax_onednn
