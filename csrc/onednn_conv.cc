// oneDNN convolutions with fused post-ops as an XLA:CPU custom call (jax.ffi).
//
// One FFI handler, RsjaxOnednnConv, computes for NHWC `x` and a weights blob already in the
// primitive's preferred layout
//
//     y = relu?( conv(x, W) + bias  (+ r if sum) )
//
// with oneDNN's forward-inference convolution: bias through the primitive's bias argument,
// the residual `r` through a `sum` post-op (the residual buffer is aliased to the output by the
// caller, so oneDNN accumulates into it), ReLU through an `eltwise_relu` post-op. float32 in and
// out, or bfloat16 in and out with float32 accumulation (bias always float32).
//
// Primitives are created once per (problem, batch) and cached; weights are reordered into the
// layout oneDNN prefers once, on the host, by rsjax_onednn_prepare_weights (called through
// ctypes when the classifier is built). The library is not linked here: the Python loader opens
// libdnnl with RTLD_GLOBAL first (rsjax/kernels/onednn.py), which resolves the dnnl_* symbols.

#include <oneapi/dnnl/dnnl.hpp>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
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

// The problem, apart from the batch: the layout of the int64 arrays passed from Python.
enum : int { kDtype, kH, kW, kC, kO, kKh, kKw, kSh, kSw, kPt, kPb, kPl, kPr, kRelu, kSum, kBias, kNumParams };
constexpr int64_t kRefBatch = 64;  // batch of the primitive that fixes the weights blob's layout

struct Problem {
  int64_t p[kNumParams];
  int64_t oh() const { return (p[kH] + p[kPt] + p[kPb] - p[kKh]) / p[kSh] + 1; }
  int64_t ow() const { return (p[kW] + p[kPl] + p[kPr] - p[kKw]) / p[kSw] + 1; }
  memory::data_type dt() const { return p[kDtype] == 1 ? memory::data_type::bf16 : memory::data_type::f32; }
  std::string key(int64_t n) const {
    std::string k = std::to_string(n);
    for (int i = 0; i < kNumParams; ++i) k += "," + std::to_string(p[i]);
    return k;
  }
};

dnnl::convolution_forward::primitive_desc MakePd(const Problem& pb, int64_t n) {
  const int64_t* p = pb.p;
  auto dt = pb.dt();
  memory::desc src({n, p[kC], p[kH], p[kW]}, dt, memory::format_tag::nhwc);
  memory::desc dst({n, p[kO], pb.oh(), pb.ow()}, dt, memory::format_tag::nhwc);
  memory::desc wei({p[kO], p[kC], p[kKh], p[kKw]}, dt, memory::format_tag::any);
  memory::desc bia({p[kO]}, memory::data_type::f32, memory::format_tag::a);
  dnnl::post_ops po;
  if (p[kSum]) po.append_sum(1.f);
  if (p[kRelu]) po.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  dnnl::primitive_attr attr;
  attr.set_post_ops(po);
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  memory::dims strides{p[kSh], p[kSw]}, pad_l{p[kPt], p[kPl]}, pad_r{p[kPb], p[kPr]};
  if (p[kBias])
    return dnnl::convolution_forward::primitive_desc(Engine(), dnnl::prop_kind::forward_inference,
                                                     dnnl::algorithm::convolution_direct, src, wei, bia, dst,
                                                     strides, pad_l, pad_r, attr);
  return dnnl::convolution_forward::primitive_desc(Engine(), dnnl::prop_kind::forward_inference,
                                                   dnnl::algorithm::convolution_direct, src, wei, dst, strides,
                                                   pad_l, pad_r, attr);
}

// A cached primitive; `blob_md` is the weights layout of the prepared blob (that of the
// kRefBatch primitive). When the primitive for this batch wants another layout, `to_pd` reorders
// the blob into `wei_md` on every call (correct, slower; reported by rsjax_onednn_impl).
struct Entry {
  dnnl::convolution_forward::primitive_desc pd;
  dnnl::convolution_forward prim;
  memory::desc blob_md, wei_md;
  bool relayout = false;
  dnnl::reorder to_pd;
  size_t scratch_bytes = 0;
};

std::mutex g_mu;
std::unordered_map<std::string, std::shared_ptr<Entry>> g_cache;

memory::desc BlobMd(const Problem& pb) {
  static std::unordered_map<std::string, memory::desc> blob;
  std::string k = pb.key(kRefBatch);
  auto it = blob.find(k);  // called with g_mu held
  if (it != blob.end()) return it->second;
  return blob[k] = MakePd(pb, kRefBatch).weights_desc();
}

std::shared_ptr<Entry> Get(const Problem& pb, int64_t n) {
  std::lock_guard<std::mutex> lock(g_mu);
  std::string k = pb.key(n);
  auto it = g_cache.find(k);
  if (it != g_cache.end()) return it->second;
  auto e = std::make_shared<Entry>();
  e->pd = MakePd(pb, n);
  e->prim = dnnl::convolution_forward(e->pd);
  e->blob_md = BlobMd(pb);
  e->wei_md = e->pd.weights_desc();
  e->relayout = !(e->blob_md == e->wei_md);
  if (e->relayout) e->to_pd = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), e->blob_md, Engine(), e->wei_md));
  e->scratch_bytes = e->pd.scratchpad_desc().get_size();
  g_cache[k] = e;
  return e;
}

// y = conv(x, blob) + bias (+ y_in if sum) then relu: the buffers are raw pointers.
void Run(const Problem& pb, int64_t n, const void* x, const void* blob, const float* bias, void* y) {
  auto e = Get(pb, n);
  const int64_t* p = pb.p;
  auto dt = pb.dt();
  auto& eng = Engine();
  auto& s = Stream();
  memory src({{n, p[kC], p[kH], p[kW]}, dt, memory::format_tag::nhwc}, eng, const_cast<void*>(x));
  memory dst({{n, p[kO], pb.oh(), pb.ow()}, dt, memory::format_tag::nhwc}, eng, y);
  memory wei(e->blob_md, eng, const_cast<void*>(blob));
  if (e->relayout) {
    auto& buf = Scratch(e->wei_md.get_size(), 1);
    memory w2(e->wei_md, eng, buf.data());
    e->to_pd.execute(s, wei, w2);
    wei = w2;
  }
  auto& scratch = Scratch(e->scratch_bytes, 0);
  memory sp(e->pd.scratchpad_desc(), eng, scratch.data());
  std::unordered_map<int, memory> args{
      {DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, sp}};
  if (p[kBias]) args.insert({DNNL_ARG_BIAS, memory({{p[kO]}, memory::data_type::f32, memory::format_tag::a}, eng,
                                                   const_cast<float*>(bias))});
  e->prim.execute(s, args);
  s.wait();
}

void SetMsg(char* msg, int len, const std::string& m) {
  if (msg && len > 0) std::snprintf(msg, len, "%s", m.c_str());
}

ffi::Error ConvImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> bias, ffi::AnyBuffer res,
                    ffi::Result<ffi::AnyBuffer> y, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt,
                    int64_t pb, int64_t pl, int64_t pr, int64_t relu, int64_t sum, int64_t has_bias) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 4 || yd.size() != 4) return ffi::Error::InvalidArgument("onednn conv: NHWC operands expected");
  ffi::DataType t = x.element_type();
  if ((t != ffi::DataType::F32 && t != ffi::DataType::BF16) || y->element_type() != t)
    return ffi::Error::InvalidArgument("onednn conv: float32 or bfloat16 operands of one dtype expected");
  Problem prob{{t == ffi::DataType::BF16 ? 1 : 0, xd[1], xd[2], xd[3], yd[3], kh, kw, sh, sw, pt, pb, pl, pr, relu,
                sum, has_bias}};
  if (prob.oh() != yd[1] || prob.ow() != yd[2] || yd[0] != xd[0])
    return ffi::Error::InvalidArgument("onednn conv: output shape does not match the convolution");
  void* out = y->untyped_data();
  if (sum) {
    if (res.element_count() != y->element_count() || res.element_type() != t)
      return ffi::Error::InvalidArgument("onednn conv: residual must have the output's shape and dtype");
    if (res.untyped_data() != out) std::memcpy(out, res.untyped_data(), y->size_bytes());
  }
  try {
    Run(prob, xd[0], x.untyped_data(), w.untyped_data(), bias.typed_data(), out);
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn conv: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RsjaxOnednnConv, ConvImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // x, NHWC
                                  .Arg<ffi::AnyBuffer>()         // weights blob (uint8)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias (O,), unused without has_bias
                                  .Arg<ffi::AnyBuffer>()         // residual, aliased to y when sum
                                  .Ret<ffi::AnyBuffer>()         // y, NHWC
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pb")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("pr")
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("sum")
                                  .Attr<int64_t>("has_bias"));

extern "C" {

// 0 when a CPU engine can be created; otherwise 1 and the reason in msg.
int rsjax_onednn_init(char* msg, int len) {
  try {
    Engine();
    SetMsg(msg, len, "");
    return 0;
  } catch (const dnnl::error& e) {
    SetMsg(msg, len, e.what());
    return 1;
  }
}

// Bytes of the weights blob for the problem `p` (kNumParams int64), or -1 (reason in msg).
int64_t rsjax_onednn_weights_bytes(const int64_t* p, char* msg, int len) {
  Problem pb;
  std::memcpy(pb.p, p, sizeof(pb.p));
  try {
    std::lock_guard<std::mutex> lock(g_mu);
    return static_cast<int64_t>(BlobMd(pb).get_size());
  } catch (const dnnl::error& e) {
    SetMsg(msg, len, e.what());
    return -1;
  }
}

// The HWIO float32 kernel `hwio` reordered (and converted to the problem's dtype) into `out`.
int rsjax_onednn_prepare_weights(const int64_t* p, const float* hwio, void* out, char* msg, int len) {
  Problem pb;
  std::memcpy(pb.p, p, sizeof(pb.p));
  try {
    memory::desc blob;
    {
      std::lock_guard<std::mutex> lock(g_mu);
      blob = BlobMd(pb);
    }
    auto& eng = Engine();
    memory src({{p[kO], p[kC], p[kKh], p[kKw]}, memory::data_type::f32, memory::format_tag::hwio}, eng,
               const_cast<float*>(hwio));
    memory dst(blob, eng, out);
    dnnl::reorder(src, dst).execute(Stream(), src, dst);
    Stream().wait();
    return 0;
  } catch (const dnnl::error& e) {
    SetMsg(msg, len, e.what());
    return 1;
  }
}

// The implementation oneDNN picked for batch n (e.g. "brg_conv_fwd:avx512_core_bf16"), with
// " +relayout" when the blob must be reordered per call; "" and the reason in msg on failure.
int rsjax_onednn_impl(const int64_t* p, int64_t n, char* out, int len) {
  Problem pb;
  std::memcpy(pb.p, p, sizeof(pb.p));
  try {
    auto e = Get(pb, n);
    SetMsg(out, len, std::string(e->pd.impl_info_str()) + (e->relayout ? " +relayout" : ""));
    return 0;
  } catch (const dnnl::error& e) {
    SetMsg(out, len, e.what());
    return 1;
  }
}

// benchdnn-style timing of the cached primitive for batch n on internal buffers: the best of
// `reps` executions, in seconds (-1 on failure). The inputs are zeros: timing only.
double rsjax_onednn_time(const int64_t* p, int64_t n, int reps) {
  Problem pb;
  std::memcpy(pb.p, p, sizeof(pb.p));
  try {
    auto e = Get(pb, n);
    size_t es = pb.dt() == memory::data_type::bf16 ? 2 : 4;
    std::vector<uint8_t> x(static_cast<size_t>(n * p[kH] * p[kW] * p[kC]) * es);
    std::vector<uint8_t> y(static_cast<size_t>(n * pb.oh() * pb.ow() * p[kO]) * es);
    std::vector<uint8_t> w(e->blob_md.get_size());
    std::vector<float> b(p[kO]);
    double best = 1e30;
    for (int i = 0; i < reps; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      Run(pb, n, x.data(), w.data(), b.data(), y.data());
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return best;
  } catch (const dnnl::error&) {
    return -1.0;
  }
}

}  // extern "C"
