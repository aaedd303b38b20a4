// Experiment: CUTLASS's Hopper attention forward (examples/88_hopper_fmha in the nvidia-cutlass wheel, used as a
// header library) for this model's attention: bf16, head dim 64, causal, GQA. Its O and LSE are meant to feed
// cuDNN's backward (aten::_scaled_dot_product_cudnn_attention_backward), so only the forward is replaced.
// GQA: one launch per query head within a KV group (G launches); each sees KV heads with a head stride of G*D.
// HQ_KIND picks the kernel: 0 = TMA (not warp-specialized), 1 = warp-specialized cooperative, 2 = ping-pong.
#include <cuda_runtime.h>
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/kernel_hardware_info.h"
#include "collective/fmha_fusion.hpp"
#include "device/device_universal.hpp"
#include "kernel/fmha_kernel_builder.hpp"

using namespace cute;
using namespace cutlass::fmha::kernel;
using namespace cutlass::fmha::collective;

#ifndef HQ_KIND
#define HQ_KIND 2
#endif
#ifndef HQ_BQ
#define HQ_BQ 128
#endif
#ifndef HQ_BK
#define HQ_BK 64
#endif

using Element = cutlass::bfloat16_t;
using HqStride = cute::tuple<int, _1, cute::tuple<int, int>>;  // (row, D, (B, H))
using StrideLSE = cute::tuple<_1, cute::tuple<int, int>>;    // (row, (B, H))
using Policy = std::conditional_t<HQ_KIND == 0, cutlass::gemm::KernelTma,
               std::conditional_t<HQ_KIND == 1, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                                  cutlass::gemm::KernelTmaWarpSpecializedPingpong>>;
using HqTile = Shape<Int<HQ_BQ>, Int<HQ_BK>, _64>;
using Op = cutlass::device::Universal<typename FmhaBuilder<
    Element, float, float, HqTile, HqStride, HqStride, HqStride, CausalFusion, Policy>::Kernel>;

// q, o [B,T,H,64] and k, v [B,T,KV,64], contiguous bf16; lse [B,H,T] fp32 (natural log, softmax scale 1/8).
extern "C" int hq_fmha_fwd(const void* q, const void* k, const void* v, void* o, float* lse,
                           int B, int T, int H, int KV, cudaStream_t stream) {
  static int sms = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(0);
  const int D = 64, G = H / KV;
  cutlass::KernelHardwareInfo hw;
  hw.device_id = 0;
  hw.sm_count = sms;
  for (int g = 0; g < G; ++g) {
    HqStride sq = make_stride(H * D, _1{}, make_stride(T * H * D, G * D));
    HqStride skv = make_stride(KV * D, _1{}, make_stride(T * KV * D, D));
    StrideLSE sl = make_stride(_1{}, make_stride(H * T, G * T));
    typename Op::Arguments args{
        cute::make_tuple(B, KV, T, T, D),
        {(const Element*)q + g * D, sq, (const Element*)k, skv, (const Element*)v, skv},
        {(Element*)o + g * D, sq, lse + g * T, sl},
        hw};
    Op op;
    if (op.can_implement(args) != cutlass::Status::kSuccess) return 1;
    if (op.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return 2;
    if (op.run(stream) != cutlass::Status::kSuccess) return 3;
  }
  return cudaGetLastError() == cudaSuccess ? 0 : 4;
}

// The example's backward (its three kernels: sum of O*dO, the main loop, dQ to 16 bits), MHA only: H query heads,
// K/V already expanded to H heads. In fp16: the example's bf16 backward does not compile (no float-to-bf16
// assignment in two of its headers); tensor cores run fp16 and bf16 at the same rate, so this times it. All tensors [B,T,H,64] contiguous; lse [B,H,T] fp32. Tile: HQ_BWD_BQ x HQ_BWD_BK.
#ifndef HQ_BWD_BQ
#define HQ_BWD_BQ 64
#endif
#ifndef HQ_BWD_BK
#define HQ_BWD_BK 128
#endif
#include "device/fmha_device_bwd.hpp"
using ElementBwd = cutlass::half_t;
using OpBwd = cutlass::fmha::device::FmhaBwd<ElementBwd, float, Shape<Int<HQ_BWD_BQ>, Int<HQ_BWD_BK>, _64>, CausalFusion>;

static OpBwd::Arguments bwd_args(const void* q, const void* k, const void* v, const void* o, const float* lse,
                                 const void* dout, void* dq, void* dk, void* dv, int B, int T, int H) {
  static int sms = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(0);
  const int D = 64;
  cute::tuple<int, int, int, _1> s = make_stride(T * H * D, D, H * D, _1{});  // (B, H, row, D)
  cute::tuple<int, int, _1> sl = make_stride(H * T, T, _1{});
  cutlass::KernelHardwareInfo hw;
  hw.device_id = 0;
  hw.sm_count = sms;
  return OpBwd::Arguments{cute::make_tuple(B, H, T, T, D),
                          (const ElementBwd*)q, s, (const ElementBwd*)k, s, (const ElementBwd*)v, s,
                          (const ElementBwd*)o, s, lse, sl, (const ElementBwd*)dout, s,
                          (ElementBwd*)dq, s, (ElementBwd*)dk, s, (ElementBwd*)dv, s, hw};
}

extern "C" size_t hq_fmha_bwd_workspace(int B, int T, int H) {
  return OpBwd::get_workspace_size(bwd_args(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                            nullptr, B, T, H));
}

extern "C" int hq_fmha_bwd(const void* q, const void* k, const void* v, const void* o, const float* lse,
                           const void* dout, void* dq, void* dk, void* dv, void* workspace, int B, int T, int H,
                           cudaStream_t stream) {
  auto args = bwd_args(q, k, v, o, lse, dout, dq, dk, dv, B, T, H);
  OpBwd op;
  if (op.can_implement(args) != cutlass::Status::kSuccess) return 1;
  if (op.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 2;
  if (op.run(stream) != cutlass::Status::kSuccess) return 3;
  return cudaGetLastError() == cudaSuccess ? 0 : 4;
}
