// The MLP's two fused matmuls as CUTLASS 3 warp-specialized Hopper (sm_90a) GEMMs: their epilogues run in
// other warps than the main loop, which Triton 3.6 cannot compile for Hopper (fused_kernels.py's kernels run
// matmul and epilogue one after the other). Same arithmetic as fused_kernels.mlp_act_epilogue, bit for bit:
//   forward:  h = bf16(x @ w_up^T), stored as CUTLASS's "aux" output; D = a = leaky_relu(h, 0.5)^2
//   backward: D = grad_h = bf16(grad_y @ w_down) * h * (h > 0 ? 2 : 0.5), h loaded as "aux"
// A plain shared library (no torch headers, so no ABI ties), built by fused_kernels.build_cutlass_mlp and
// called through ctypes. HQ_* macros pick the schedule, tile and cluster (swept at commit 8bc5ef9's bench/experiments/cutlass_mlp.py).
#include <cuda_runtime.h>
#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;
using bf16 = cutlass::bfloat16_t;

__host__ __device__ inline float round_bf16(float x) { return float(bf16(x)); }

template <class T> struct LeakySq {  // input: the fp32 accumulator; rounded as the stored h is
  CUTLASS_HOST_DEVICE T operator()(T x) const {
    float c = round_bf16(float(x)), a = c > 0.f ? c : 0.5f * c;
    return T(a * a);
  }
};
template <class T, int N> struct LeakySq<cutlass::Array<T, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& x) const {
    cutlass::Array<T, N> y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = LeakySq<T>{}(x[i]);
    return y;
  }
};

template <class T> struct LeakySqGrad {  // (the fp32 accumulator of grad_y @ w_down, h)
  CUTLASS_HOST_DEVICE T operator()(T g, T h) const {
    float hf = float(h);
    return T(round_bf16(float(g)) * hf * (hf > 0.f ? 2.f : 0.5f));
  }
};
template <class T, int N> struct LeakySqGrad<cutlass::Array<T, N>> {
  template <class U>
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& g, cutlass::Array<U, N> const& h) const {
    cutlass::Array<T, N> y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = LeakySqGrad<T>{}(g[i], T(h[i]));
    return y;
  }
};

#ifndef HQ_TILE_M  // 1x H100, 262,144 x 512 -> 2,048: the fastest of seven in that sweep
#define HQ_TILE_M 128
#define HQ_TILE_N 128
#define HQ_CLUSTER_M 2
#define HQ_PINGPONG 1
#endif
#ifndef HQ_CLUSTER_N
#define HQ_CLUSTER_N 1
#endif
#ifndef HQ_EPI_N  // the epilogue's sub-tile (0: CUTLASS picks); 64x64 was the fastest of three
#define HQ_EPI_M 64
#define HQ_EPI_N 64
#endif
#ifndef HQ_RASTER  // tile order: 0 CUTLASS's heuristic, 1 along M, 2 along N
#define HQ_RASTER 0
#endif
#ifndef HQ_SWIZZLE
#define HQ_SWIZZLE 1
#endif
using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;
using MlpTile = Shape<Int<HQ_TILE_M>, Int<HQ_TILE_N>, _64>;
using MlpCluster = Shape<Int<HQ_CLUSTER_M>, Int<HQ_CLUSTER_N>, _1>;
using EpiTile = cute::conditional_t<HQ_EPI_N == 0, cutlass::epilogue::collective::EpilogueTileAuto,
                                    Shape<Int<(HQ_EPI_M > 0 ? HQ_EPI_M : 64)>, Int<(HQ_EPI_N > 0 ? HQ_EPI_N : 32)>>>;
// Pingpong: two consumer warpgroups on two tiles, one's epilogue beside the other's main loop.
using Sched = cute::conditional_t<HQ_PINGPONG, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                  cutlass::gemm::KernelTmaWarpSpecializedCooperative>;
using EpiSched = cute::conditional_t<HQ_PINGPONG, cutlass::epilogue::TmaWarpSpecialized,
                                     cutlass::epilogue::TmaWarpSpecializedCooperative>;

// GRAD=false: B = w_up [N, K] row-major = K-major ("column-major" K x N). GRAD=true: B = w_down [K, N] row-major.
template <bool GRAD>
struct MlpGemm {
  using LayoutB = cute::conditional_t<GRAD, RowMajor, ColumnMajor>;
  using Fusion = cute::conditional_t<GRAD,
      cutlass::epilogue::fusion::LinCombDeEltAct<RowMajor, LeakySqGrad, bf16, float, bf16, bf16>,
      cutlass::epilogue::fusion::LinCombPerRowBiasEltActAux<RowMajor, LeakySq, bf16, float, bf16, bf16, bf16>>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, MlpTile, MlpCluster,
      EpiTile, float, float,
      void, RowMajor, 8, bf16, RowMajor, 8, EpiSched, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, bf16, RowMajor, 8, bf16, LayoutB, 8, float, MlpTile, MlpCluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      Sched>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // out = D (a, or grad_h); aux = h (written forward, read backward)
  static int run(const void* A, const void* B, void* aux, void* out, int M, int N, int K, cudaStream_t stream) {
    static void* workspace = nullptr;
    static size_t workspace_bytes = 0;
    static int sm_count = 0;
    if (!sm_count) {
      int dev;
      cudaGetDevice(&dev);
      cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, dev);
    }
    auto sA = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, make_shape(M, K, 1));
    auto sB = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(N, K, 1));
    auto sD = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(M, N, 1));
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm, {M, N, K, 1},
                                  {static_cast<const bf16*>(A), sA, static_cast<const bf16*>(B), sB},
                                  {{}, nullptr, sD, static_cast<bf16*>(out), sD}};
    args.hw_info.sm_count = sm_count;
    args.scheduler.raster_order = static_cast<cutlass::gemm::kernel::detail::RasterOrderOptions>(HQ_RASTER);
    args.scheduler.max_swizzle_size = HQ_SWIZZLE;
    args.epilogue.thread.alpha = 1.f;
    args.epilogue.thread.beta = 0.f;
    args.epilogue.thread.aux_ptr = static_cast<bf16*>(aux);
    args.epilogue.thread.dAux = sD;
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
    size_t need = Gemm::get_workspace_size(args);
    if (need > workspace_bytes) {
      if (workspace) cudaFree(workspace);
      if (cudaMalloc(&workspace, need) != cudaSuccess) return 2;
      workspace_bytes = need;
    }
    if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 3;
    if (gemm.run(stream) != cutlass::Status::kSuccess) return 4;
    return cudaGetLastError() == cudaSuccess ? 0 : 5;
  }
};

extern "C" int hq_mlp_up_act(const void* x, const void* w_up, void* h, void* a, int M, int N, int K, void* stream) {
  return MlpGemm<false>::run(x, w_up, h, a, M, N, K, static_cast<cudaStream_t>(stream));
}

extern "C" int hq_mlp_act_grad(const void* grad_y, const void* w_down, const void* h, void* grad_h, int M, int N, int K,
                               void* stream) {
  return MlpGemm<true>::run(grad_y, w_down, const_cast<void*>(h), grad_h, M, N, K, static_cast<cudaStream_t>(stream));
}
