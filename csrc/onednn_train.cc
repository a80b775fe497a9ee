// oneDNN convolutions for training as XLA:CPU custom calls (jax.ffi): the forward pass and both
// gradients, on plain NHWC activations and HWIO weights (the weights change every step, so there
// is no prepared blob as in onednn_conv.cc).
//
// For y = conv(x, W) with strides s and explicit padding (pt, pb, pl, pr), float32 throughout:
//
//     RsjaxOnednnTrainFwd         (x, W)  -> y                      forward_training
//     RsjaxOnednnTrainBwdData     (g, W)  -> dx = (dy/dx)^T g       convolution_backward_data
//     RsjaxOnednnTrainBwdWeights  (x, g)  -> dW = sum_b (dy_b/dW)^T g_b   convolution_backward_weights
//
// Each primitive lets oneDNN choose its weights layout (format_tag::any); the HWIO weights are
// reordered into it on every call (a few MB per step for a CIFAR ResNet), and the weight gradient
// is reordered back into HWIO. Primitives are created once per problem (batch included) and
// cached; scratchpads are per thread. The library is resolved at load time as for onednn_conv.cc.

#include <oneapi/dnnl/dnnl.hpp>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "onednn_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

using rsjax_onednn::Engine;
using rsjax_onednn::Scratch;
using rsjax_onednn::Stream;

enum Kind : int { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

struct Shape {
  int64_t n, h, w, c, o, kh, kw, sh, sw, pt, pb, pl, pr;
  int64_t oh() const { return (h + pt + pb - kh) / sh + 1; }
  int64_t ow() const { return (w + pl + pr - kw) / sw + 1; }
  std::string key(int kind) const {
    std::string k = std::to_string(kind);
    for (int64_t v : {n, h, w, c, o, kh, kw, sh, sw, pt, pb, pl, pr}) k += "," + std::to_string(v);
    return k;
  }
  memory::desc src() const { return {{n, c, h, w}, memory::data_type::f32, memory::format_tag::nhwc}; }
  memory::desc dst() const { return {{n, o, oh(), ow()}, memory::data_type::f32, memory::format_tag::nhwc}; }
  memory::desc wei_any() const { return {{o, c, kh, kw}, memory::data_type::f32, memory::format_tag::any}; }
  memory::desc wei_hwio() const { return {{o, c, kh, kw}, memory::data_type::f32, memory::format_tag::hwio}; }
  memory::dims strides() const { return {sh, sw}; }
  memory::dims pad_l() const { return {pt, pl}; }
  memory::dims pad_r() const { return {pb, pr}; }
};

// Deterministic implementations only (oneDNN "Primitive Attributes: deterministic"): a training run
// and its resumption after a kill must give the same bits (same machine, build and thread count), so
// no implementation may reduce through atomics in a run-dependent order.
dnnl::primitive_attr Attr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  attr.set_deterministic(true);
  return attr;
}

dnnl::convolution_forward::primitive_desc FwdPd(const Shape& s) {
  return dnnl::convolution_forward::primitive_desc(Engine(), dnnl::prop_kind::forward_training,
                                                   dnnl::algorithm::convolution_direct, s.src(), s.wei_any(), s.dst(),
                                                   s.strides(), s.pad_l(), s.pad_r(), Attr());
}

// One cached primitive with the weights layout it wants and the reorder between that and HWIO.
struct Entry {
  dnnl::primitive prim;
  memory::desc wei_md, scratch_md, impl_md;
  bool relayout = false;
  dnnl::reorder reorder;  // HWIO -> wei_md (fwd, bwd data) or wei_md -> HWIO (bwd weights)
  std::string impl;
};

std::mutex g_mu;
std::unordered_map<std::string, std::shared_ptr<Entry>> g_cache;

std::shared_ptr<Entry> Get(const Shape& s, int kind) {
  std::lock_guard<std::mutex> lock(g_mu);
  std::string k = s.key(kind);
  auto it = g_cache.find(k);
  if (it != g_cache.end()) return it->second;
  auto e = std::make_shared<Entry>();
  auto& eng = Engine();
  if (kind == kFwd) {
    auto pd = FwdPd(s);
    e->prim = dnnl::convolution_forward(pd);
    e->wei_md = pd.weights_desc();
    e->scratch_md = pd.scratchpad_desc();
    e->impl = pd.impl_info_str();
  } else if (kind == kBwdData) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(eng, dnnl::algorithm::convolution_direct, s.src(),
                                                              s.wei_any(), s.dst(), s.strides(), s.pad_l(),
                                                              s.pad_r(), FwdPd(s), Attr());
    e->prim = dnnl::convolution_backward_data(pd);
    e->wei_md = pd.weights_desc();
    e->scratch_md = pd.scratchpad_desc();
    e->impl = pd.impl_info_str();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(eng, dnnl::algorithm::convolution_direct, s.src(),
                                                                 s.wei_any(), s.dst(), s.strides(), s.pad_l(),
                                                                 s.pad_r(), FwdPd(s), Attr());
    e->prim = dnnl::convolution_backward_weights(pd);
    e->wei_md = pd.diff_weights_desc();
    e->scratch_md = pd.scratchpad_desc();
    e->impl = pd.impl_info_str();
  }
  e->relayout = !(e->wei_md == s.wei_hwio());
  if (e->relayout) {
    e->reorder = kind == kBwdWeights
                     ? dnnl::reorder(dnnl::reorder::primitive_desc(eng, e->wei_md, eng, s.wei_hwio()))
                     : dnnl::reorder(dnnl::reorder::primitive_desc(eng, s.wei_hwio(), eng, e->wei_md));
  }
  g_cache[k] = e;
  return e;
}

// Runs primitive `kind` on raw buffers: `a` is x (fwd, bwd weights) or g (bwd data), `b` is W
// (fwd, bwd data, HWIO) or g (bwd weights), `out` is y, dx or dW (HWIO).
void Run(const Shape& s, int kind, const void* a, const void* b, void* out) {
  auto e = Get(s, kind);
  auto& eng = Engine();
  auto& st = Stream();
  auto& scratch = Scratch(e->scratch_md.get_size(), 0);
  memory sp(e->scratch_md, eng, scratch.data());
  std::unordered_map<int, memory> args{{DNNL_ARG_SCRATCHPAD, sp}};
  if (kind == kBwdWeights) {
    memory dw_plain(s.wei_hwio(), eng, out);
    memory dw = dw_plain;
    if (e->relayout) dw = memory(e->wei_md, eng, Scratch(e->wei_md.get_size(), 1).data());
    args.insert({DNNL_ARG_SRC, memory(s.src(), eng, const_cast<void*>(a))});
    args.insert({DNNL_ARG_DIFF_DST, memory(s.dst(), eng, const_cast<void*>(b))});
    args.insert({DNNL_ARG_DIFF_WEIGHTS, dw});
    e->prim.execute(st, args);
    if (e->relayout) e->reorder.execute(st, dw, dw_plain);
  } else {
    memory w(s.wei_hwio(), eng, const_cast<void*>(b));
    if (e->relayout) {
      memory w2(e->wei_md, eng, Scratch(e->wei_md.get_size(), 1).data());
      e->reorder.execute(st, w, w2);
      w = w2;
    }
    args.insert({DNNL_ARG_WEIGHTS, w});
    if (kind == kFwd) {
      args.insert({DNNL_ARG_SRC, memory(s.src(), eng, const_cast<void*>(a))});
      args.insert({DNNL_ARG_DST, memory(s.dst(), eng, out)});
    } else {
      args.insert({DNNL_ARG_DIFF_DST, memory(s.dst(), eng, const_cast<void*>(a))});
      args.insert({DNNL_ARG_DIFF_SRC, memory(s.src(), eng, out)});
    }
    e->prim.execute(st, args);
  }
  st.wait();
}

// The problem of a convolution of x (N, H, W, C) with W (KH, KW, C, O) giving y (N, OH, OW, O),
// whichever of the three is the handler's output; InvalidArgument unless the shapes agree.
template <typename Dims>
ffi::Error MakeShape(Dims xd, Dims wd, Dims yd, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                     int64_t pr, Shape* s) {
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4) return ffi::Error::InvalidArgument("onednn: 4-d operands");
  *s = Shape{xd[0], xd[1], xd[2], xd[3], wd[3], wd[0], wd[1], sh, sw, pt, pb, pl, pr};
  bool ok = wd[2] == s->c && yd[0] == s->n && yd[3] == s->o && sh >= 1 && sw >= 1 && s->oh() >= 1 &&
            s->ow() >= 1 && yd[1] == s->oh() && yd[2] == s->ow();
  if (!ok) return ffi::Error::InvalidArgument("onednn train conv: operand shapes do not match the convolution");
  return ffi::Error::Success();
}

ffi::Error Call(const Shape& s, int kind, const void* a, const void* b, void* out, size_t out_bytes) {
  if (s.n == 0 || s.c == 0 || s.o == 0) {
    std::memset(out, 0, out_bytes);
    return ffi::Error::Success();
  }
  try {
    Run(s, kind, a, b, out);
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn train conv: ") + e.what());
  } catch (const std::exception& e) {  // e.g. bad_alloc of a scratch buffer
    return ffi::Error::Internal(std::string("onednn train conv: ") + e.what());
  }
  return ffi::Error::Success();
}

// y = conv(x, W)
ffi::Error FwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y, int64_t sh,
                   int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Shape s;
  auto err = MakeShape(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr, &s);
  if (!err.success()) return err;
  return Call(s, kFwd, x.typed_data(), w.typed_data(), y->typed_data(), y->size_bytes());
}

// dx from g (y-shaped) and W
ffi::Error BwdDataImpl(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> dx, int64_t sh,
                       int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Shape s;
  auto err = MakeShape(dx->dimensions(), w.dimensions(), g.dimensions(), sh, sw, pt, pb, pl, pr, &s);
  if (!err.success()) return err;
  return Call(s, kBwdData, g.typed_data(), w.typed_data(), dx->typed_data(), dx->size_bytes());
}

// dW (HWIO) from x and g (y-shaped)
ffi::Error BwdWeightsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dw,
                          int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Shape s;
  auto err = MakeShape(x.dimensions(), dw->dimensions(), g.dimensions(), sh, sw, pt, pb, pl, pr, &s);
  if (!err.success()) return err;
  return Call(s, kBwdWeights, x.typed_data(), g.typed_data(), dw->typed_data(), dw->size_bytes());
}

// The identity on a buffer that XLA must materialise: the output aliases the input
// (input_output_aliases {0: 0}), so nothing is copied unless XLA gave them different buffers.
// XLA:CPU's fusion pass recomputes elementwise producers inside every consumer instead of reading
// a buffer they already wrote; routing a value through this opaque call cuts such a chain.
ffi::Error MaterializeImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  if (x.size_bytes() != y->size_bytes())
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "rsjax materialize: input and output sizes differ");
  if (x.untyped_data() != y->untyped_data()) std::memcpy(y->untyped_data(), x.untyped_data(), x.size_bytes());
  return ffi::Error::Success();
}

#define RSJAX_TRAIN_ATTRS                                                                                   \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pb").Attr<int64_t>("pl") \
      .Attr<int64_t>("pr")

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RsjaxOnednnTrainFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() RSJAX_TRAIN_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(RsjaxOnednnTrainBwdData, BwdDataImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() RSJAX_TRAIN_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(RsjaxOnednnTrainBwdWeights, BwdWeightsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() RSJAX_TRAIN_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(RsjaxMaterialize, MaterializeImpl,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

extern "C" {

// The implementation oneDNN picked for primitive `kind` (0 fwd, 1 bwd data, 2 bwd weights) of the
// problem s = (n, h, w, c, o, kh, kw, sh, sw, pt, pb, pl, pr), " +relayout" when the weights are
// reordered per call; the reason on failure (return 1).
int rsjax_onednn_train_impl(const int64_t* p, int kind, char* out, int len) {
  if (kind < kFwd || kind > kBwdWeights) {
    if (out && len > 0) std::snprintf(out, len, "unknown primitive kind %d", kind);
    return 1;
  }
  Shape s{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12]};
  std::string m;
  int rc = 0;
  try {
    auto e = Get(s, kind);
    m = e->impl + (e->relayout ? " +relayout" : "");
  } catch (const dnnl::error& e) {
    m = e.what();
    rc = 1;
  }
  if (out && len > 0) std::snprintf(out, len, "%s", m.c_str());
  return rc;
}

}  // extern "C"
