// GroupNorm (+ time-embedding add) (+ SiLU), forward and backward, for NCHW and channels_last (NHWC) inputs.
// Registered as torch.ops.nitrokernels_cuda.group_norm_silu_fwd / group_norm_silu_bwd; the semantics, the
// checks users see and the eager reference live in nitrokernels/ops/group_norm.py.
//
// With y = x + temb[n, c] (temb optional) and groups of Cg = C / G channels, per group (n, g):
//   mean, rstd = mean(y), 1 / sqrt(var(y) + eps)   (fp32, biased)      xhat = (y - mean) * rstd
//   z = xhat * w[c] + b[c]                         out = silu(z) (act) or z
// Backward (dz = dout * silu'(z); c1 = sum_g(dz w) / M, c2 = sum_g(dz w xhat) / M, M = Cg * HW):
//   dx = rstd * (dz w - c1 - xhat c2),  dweight = sum dz xhat,  dbias = sum dz,  dtemb[n, c] = sum_hw dx.
//
// Batch 1 must fill the GPU, so no kernel has one block per (sample, group). Every pass is split over
// spatial chunks (K per sample):
//   forward : stats (per-channel mean / M2 of each chunk)  ->  finalize (one block per (n, g): Chan-merge the
//             chunk partials into mean / rstd, temb folded in exactly, per-channel a, s with z = x a + s)
//             ->  apply (out = act(x a + s), one FMA per element)
//   backward: reduce (per-channel chunk sums of dz, dz xhat, xhat)  ->  finalize (c1, c2, dtemb, and
//             dweight / dbias directly when N == 1, else a small column-sum kernel)  ->  apply (dx)
// NCHW: a warp owns one chunk of one (n, c) row (contiguous), lanes read 16 bytes each.
// NHWC: a block owns a chunk of spatial rows of one sample; each thread keeps a fixed 16-byte vector of
//       channels (so per-channel coefficients and accumulators stay in registers) and walks rows; partial sums
//       of the threads sharing a channel vector are combined in shared memory.
// 16-byte vector loads/stores whenever the contiguous dimension (HW for NCHW, C for NHWC) is a multiple of
// the vector width and every pointer is 16-byte aligned; otherwise the same kernels run one element per access.
// Inside a chunk, statistics use sums shifted by the chunk's first value (all threads of a row / channel share
// the shift, so the sums add); chunks are merged with Chan's formula, so there is no E[x^2] - E[x]^2 cancellation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

// Dynamic shared memory, declared through a macro so the CPU emulation in tests/test_group_norm.py can run the
// kernels unchanged (it defines its own).
#ifndef NK_DYNAMIC_SMEM
#define NK_DYNAMIC_SMEM(name) extern __shared__ float name[]
#endif

namespace nitrokernels {
namespace group_norm {
namespace {

constexpr int kThreads = 256;     // every kernel's block size (NHWC blocks use up to this many)
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kUnroll = 4;        // independent 16-byte loads in flight per thread
constexpr int kUnrollBwdNhwc = 2; // NHWC backward keeps 4 coefficients per channel in registers: unroll less

// ------------------------------------------------------------------------------------------ element access
template <int BYTES> struct RawOf;
template <> struct RawOf<16> { using type = uint4; };
template <> struct RawOf<8> { using type = uint2; };
template <> struct RawOf<4> { using type = uint32_t; };
template <> struct RawOf<2> { using type = uint16_t; };

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }

// V consecutive elements as floats; p must be aligned to V * sizeof(T) bytes.
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[V]) {
  using Raw = typename RawOf<sizeof(T) * V>::type;
  Raw raw = *reinterpret_cast<const Raw*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = to_float(e[j]);
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&in)[V]) {
  using Raw = typename RawOf<sizeof(T) * V>::type;
  Raw raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int j = 0; j < V; ++j) e[j] = static_cast<T>(in[j]);
  *reinterpret_cast<Raw*>(p) = raw;
}

// Parameters (weight, bias, temb) are either x's dtype or float32; nullptr means "absent".
struct Param {
  const void* ptr;
  bool f32;
};

template <typename T>
__device__ __forceinline__ float load_param(Param p, int64_t i, float absent) {
  if (p.ptr == nullptr) return absent;
  return p.f32 ? static_cast<const float*>(p.ptr)[i] : to_float(static_cast<const T*>(p.ptr)[i]);
}

template <typename T>
__device__ __forceinline__ void store_param(void* p, bool f32, int64_t i, float v) {
  if (f32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<T*>(p)[i] = static_cast<T>(v);
  }
}

__device__ __forceinline__ float sigmoidf(float z) { return 1.f / (1.f + __expf(-z)); }

// d out / d z times dy (act) or dy itself.
__device__ __forceinline__ float dz_of(float dy, float xhat, float w, float b, bool act) {
  if (!act) return dy;
  const float z = xhat * w + b;
  const float s = sigmoidf(z);
  return dy * s * (1.f + z * (1.f - s));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; every thread gets the result. `shared` holds >= 32 floats.
__device__ float block_sum(float v, float* shared) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  __syncthreads();  // the previous call's readers are done with shared
  if (lane == 0) shared[wid] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = threadIdx.x < warps ? shared[threadIdx.x] : 0.f;
  if (wid == 0) {
    v = warp_sum(v);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

// ===================================================================================================== NCHW
// A "task" is one chunk [k * L, min(HW, (k + 1) * L)) of one row (n, c); warp w of the grid owns task w.
struct RowTask {
  int64_t row;  // n * C + c
  int64_t start, end;
};

__device__ __forceinline__ bool row_task(int64_t rows, int K, int64_t HW, int64_t L, RowTask& t) {
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (warp >= rows * K) return false;
  t.row = warp / K;
  const int64_t k = warp - t.row * K;
  t.start = k * L;
  t.end = min(HW, t.start + L);
  return true;
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
stats_nchw(const T* __restrict__ x, float* __restrict__ pmean, float* __restrict__ pm2, int64_t rows, int64_t C,
           int64_t HW, int K, int64_t L) {
  RowTask t;
  if (!row_task(rows, K, HW, L, t)) return;
  const int lane = threadIdx.x & 31;
  const T* p = x + t.row * HW;
  const float shift = to_float(p[t.start]);
  float s1 = 0.f, s2 = 0.f;
  int64_t i = t.start + lane * V;
  for (; i + (kUnroll - 1) * 32 * V < t.end; i += kUnroll * 32 * V) {
    float v[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load_vec<T, V>(p + i + u * 32 * V, v[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float d = v[u][j] - shift;
        s1 += d;
        s2 += d * d;
      }
  }
  for (; i < t.end; i += 32 * V) {
    float v[V];
    load_vec<T, V>(p + i, v);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float d = v[j] - shift;
      s1 += d;
      s2 += d * d;
    }
  }
  s1 = warp_sum(s1);
  s2 = warp_sum(s2);
  if (lane == 0) {
    const float cnt = static_cast<float>(t.end - t.start);
    const int64_t n = t.row / C, c = t.row - n * C;
    const int64_t out = (n * K + t.start / L) * C + c;
    pmean[out] = shift + s1 / cnt;
    pm2[out] = fmaxf(s2 - s1 * s1 / cnt, 0.f);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
apply_nchw(const T* __restrict__ x, T* __restrict__ y, const float2* __restrict__ coef, int64_t rows, int64_t HW,
           int K, int64_t L, bool act) {
  RowTask t;
  if (!row_task(rows, K, HW, L, t)) return;
  const int lane = threadIdx.x & 31;
  const float2 as = coef[t.row];
  const T* p = x + t.row * HW;
  T* q = y + t.row * HW;
  int64_t i = t.start + lane * V;
  for (; i + (kUnroll - 1) * 32 * V < t.end; i += kUnroll * 32 * V) {
    float v[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load_vec<T, V>(p + i + u * 32 * V, v[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float z = fmaf(v[u][j], as.x, as.y);
        v[u][j] = act ? z * sigmoidf(z) : z;
      }
      store_vec<T, V>(q + i + u * 32 * V, v[u]);
    }
  }
  for (; i < t.end; i += 32 * V) {
    float v[V];
    load_vec<T, V>(p + i, v);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float z = fmaf(v[j], as.x, as.y);
      v[j] = act ? z * sigmoidf(z) : z;
    }
    store_vec<T, V>(q + i, v);
  }
}

// Per-row backward coefficients: xhat = x r + u, z = xhat w + b.
struct RowCoef {
  float r, u, w, b;
};

template <typename T>
__device__ __forceinline__ RowCoef row_coef(int64_t n, int64_t c, int64_t C, int64_t G, int64_t CG,
                                            const float* mean, const float* rstd, Param w, Param b, Param temb) {
  const int64_t grp = n * G + c / CG;
  RowCoef rc;
  rc.r = rstd[grp];
  rc.u = (load_param<T>(temb, n * C + c, 0.f) - mean[grp]) * rc.r;
  rc.w = load_param<T>(w, c, 1.f);
  rc.b = load_param<T>(b, c, 0.f);
  return rc;
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
bwd_reduce_nchw(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ mean,
                const float* __restrict__ rstd, Param w, Param b, Param temb, float* __restrict__ pa,
                float* __restrict__ pb, float* __restrict__ px, int64_t rows, int64_t C, int64_t G, int64_t CG,
                int64_t HW, int K, int64_t L, bool act) {
  RowTask t;
  if (!row_task(rows, K, HW, L, t)) return;
  const int lane = threadIdx.x & 31;
  const int64_t n = t.row / C, c = t.row - n * C;
  const RowCoef rc = row_coef<T>(n, c, C, G, CG, mean, rstd, w, b, temb);
  const T* p = x + t.row * HW;
  const T* g = dy + t.row * HW;
  float sa = 0.f, sb = 0.f, sx = 0.f;
  int64_t i = t.start + lane * V;
  for (; i + (kUnroll - 1) * 32 * V < t.end; i += kUnroll * 32 * V) {
    float v[kUnroll][V], d[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      load_vec<T, V>(p + i + u * 32 * V, v[u]);
      load_vec<T, V>(g + i + u * 32 * V, d[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float xhat = fmaf(v[u][j], rc.r, rc.u);
        const float dz = dz_of(d[u][j], xhat, rc.w, rc.b, act);
        sa += dz;
        sb += dz * xhat;
        sx += xhat;
      }
  }
  for (; i < t.end; i += 32 * V) {
    float v[V], d[V];
    load_vec<T, V>(p + i, v);
    load_vec<T, V>(g + i, d);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float xhat = fmaf(v[j], rc.r, rc.u);
      const float dz = dz_of(d[j], xhat, rc.w, rc.b, act);
      sa += dz;
      sb += dz * xhat;
      sx += xhat;
    }
  }
  sa = warp_sum(sa);
  sb = warp_sum(sb);
  sx = warp_sum(sx);
  if (lane == 0) {
    const int64_t out = (n * K + t.start / L) * C + c;
    pa[out] = sa;
    pb[out] = sb;
    px[out] = sx;
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
bwd_apply_nchw(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, const float* __restrict__ mean,
               const float* __restrict__ rstd, const float* __restrict__ c1, const float* __restrict__ c2, Param w,
               Param b, Param temb, int64_t rows, int64_t C, int64_t G, int64_t CG, int64_t HW, int K, int64_t L,
               bool act) {
  RowTask t;
  if (!row_task(rows, K, HW, L, t)) return;
  const int lane = threadIdx.x & 31;
  const int64_t n = t.row / C, c = t.row - n * C;
  const RowCoef rc = row_coef<T>(n, c, C, G, CG, mean, rstd, w, b, temb);
  const int64_t grp = n * G + c / CG;
  const float k_dz = rc.r * rc.w, k_x = -rc.r * c2[grp], k_0 = -rc.r * c1[grp];
  const T* p = x + t.row * HW;
  const T* g = dy + t.row * HW;
  T* q = dx + t.row * HW;
  int64_t i = t.start + lane * V;
  for (; i + (kUnroll - 1) * 32 * V < t.end; i += kUnroll * 32 * V) {
    float v[kUnroll][V], d[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      load_vec<T, V>(p + i + u * 32 * V, v[u]);
      load_vec<T, V>(g + i + u * 32 * V, d[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float xhat = fmaf(v[u][j], rc.r, rc.u);
        const float dz = dz_of(d[u][j], xhat, rc.w, rc.b, act);
        v[u][j] = fmaf(dz, k_dz, fmaf(xhat, k_x, k_0));
      }
      store_vec<T, V>(q + i + u * 32 * V, v[u]);
    }
  }
  for (; i < t.end; i += 32 * V) {
    float v[V], d[V];
    load_vec<T, V>(p + i, v);
    load_vec<T, V>(g + i, d);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float xhat = fmaf(v[j], rc.r, rc.u);
      const float dz = dz_of(d[j], xhat, rc.w, rc.b, act);
      v[j] = fmaf(dz, k_dz, fmaf(xhat, k_x, k_0));
    }
    store_vec<T, V>(q + i, v);
  }
}

// ===================================================================================================== NHWC
// Block b of the grid owns sample n = b / K, rows (spatial positions) [k * L, min(HW, (k + 1) * L)), k = b % K.
// Thread t: channel vector tv = t % VX (channels [tv * V, tv * V + V)), row offset tr = t / VX, rows step RP.
// When C / V > VX the block loops over channel vectors v0 = 0, VX, 2 VX, ...
struct BlockRows {
  int64_t n, k, start, end;
  int tv, tr;
};

__device__ __forceinline__ BlockRows block_rows(int K, int64_t HW, int64_t L, int VX) {
  BlockRows br;
  br.n = blockIdx.x / K;
  br.k = blockIdx.x - br.n * K;
  br.start = br.k * L;
  br.end = min(HW, br.start + L);
  br.tv = threadIdx.x % VX;
  br.tr = threadIdx.x / VX;
  return br;
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
stats_nhwc(const T* __restrict__ x, float* __restrict__ pmean, float* __restrict__ pm2, int64_t C, int64_t HW, int K,
           int64_t L, int VX, int RP) {
  NK_DYNAMIC_SMEM(smem);  // [2][RP][VX * V]
  const BlockRows br = block_rows(K, HW, L, VX);
  const int64_t nvec = C / V;
  const T* base = x + br.n * HW * C;
  const int width = VX * V;
  float* sm1 = smem;
  float* sm2 = smem + RP * width;
  for (int64_t v0 = 0; v0 < nvec; v0 += VX) {
    const int64_t vi = v0 + br.tv;
    const bool active = vi < nvec && br.tr < RP;
    float shift[V], s1[V], s2[V];
#pragma unroll
    for (int j = 0; j < V; ++j) s1[j] = s2[j] = shift[j] = 0.f;
    if (active) {
      const T* col = base + vi * V;
      load_vec<T, V>(col + br.start * C, shift);
      int64_t r = br.start + br.tr;
      for (; r + (kUnroll - 1) * RP < br.end; r += kUnroll * RP) {
        float v[kUnroll][V];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) load_vec<T, V>(col + (r + u * RP) * C, v[u]);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const float d = v[u][j] - shift[j];
            s1[j] += d;
            s2[j] += d * d;
          }
      }
      for (; r < br.end; r += RP) {
        float v[V];
        load_vec<T, V>(col + r * C, v);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float d = v[j] - shift[j];
          s1[j] += d;
          s2[j] += d * d;
        }
      }
    }
    __syncthreads();  // shared memory is free (previous channel-vector round done)
    if (br.tr < RP) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        sm1[br.tr * width + br.tv * V + j] = s1[j];
        sm2[br.tr * width + br.tv * V + j] = s2[j];
      }
    }
    __syncthreads();
    if (br.tr == 0 && vi < nvec) {
      const float cnt = static_cast<float>(br.end - br.start);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float a = 0.f, q = 0.f;
        for (int rr = 0; rr < RP; ++rr) {
          a += sm1[rr * width + br.tv * V + j];
          q += sm2[rr * width + br.tv * V + j];
        }
        const int64_t out = (br.n * K + br.k) * C + vi * V + j;
        pmean[out] = shift[j] + a / cnt;
        pm2[out] = fmaxf(q - a * a / cnt, 0.f);
      }
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
apply_nhwc(const T* __restrict__ x, T* __restrict__ y, const float2* __restrict__ coef, int64_t C, int64_t HW, int K,
           int64_t L, int VX, int RP, bool act) {
  const BlockRows br = block_rows(K, HW, L, VX);
  if (br.tr >= RP) return;
  const int64_t nvec = C / V;
  const int64_t sample = br.n * HW * C;
  for (int64_t vi = br.tv; vi < nvec; vi += VX) {
    float a[V], s[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float2 as = coef[br.n * C + vi * V + j];
      a[j] = as.x;
      s[j] = as.y;
    }
    const T* col = x + sample + vi * V;
    T* out = y + sample + vi * V;
    int64_t r = br.start + br.tr;
    for (; r + (kUnroll - 1) * RP < br.end; r += kUnroll * RP) {
      float v[kUnroll][V];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) load_vec<T, V>(col + (r + u * RP) * C, v[u]);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float z = fmaf(v[u][j], a[j], s[j]);
          v[u][j] = act ? z * sigmoidf(z) : z;
        }
        store_vec<T, V>(out + (r + u * RP) * C, v[u]);
      }
    }
    for (; r < br.end; r += RP) {
      float v[V];
      load_vec<T, V>(col + r * C, v);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float z = fmaf(v[j], a[j], s[j]);
        v[j] = act ? z * sigmoidf(z) : z;
      }
      store_vec<T, V>(out + r * C, v);
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
bwd_reduce_nhwc(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ mean,
                const float* __restrict__ rstd, Param w, Param b, Param temb, float* __restrict__ pa,
                float* __restrict__ pb, float* __restrict__ px, int64_t C, int64_t G, int64_t CG, int64_t HW, int K,
                int64_t L, int VX, int RP, bool act) {
  NK_DYNAMIC_SMEM(smem);  // [3][RP][VX * V]
  const BlockRows br = block_rows(K, HW, L, VX);
  const int64_t nvec = C / V;
  const int64_t sample = br.n * HW * C;
  const int width = VX * V;
  for (int64_t v0 = 0; v0 < nvec; v0 += VX) {
    const int64_t vi = v0 + br.tv;
    const bool active = vi < nvec && br.tr < RP;
    float sa[V], sb[V], sx[V];
#pragma unroll
    for (int j = 0; j < V; ++j) sa[j] = sb[j] = sx[j] = 0.f;
    if (active) {
      RowCoef rc[V];
#pragma unroll
      for (int j = 0; j < V; ++j) rc[j] = row_coef<T>(br.n, vi * V + j, C, G, CG, mean, rstd, w, b, temb);
      const T* col = x + sample + vi * V;
      const T* gcol = dy + sample + vi * V;
      int64_t r = br.start + br.tr;
      for (; r + (kUnrollBwdNhwc - 1) * RP < br.end; r += kUnrollBwdNhwc * RP) {
        float v[kUnrollBwdNhwc][V], d[kUnrollBwdNhwc][V];
#pragma unroll
        for (int u = 0; u < kUnrollBwdNhwc; ++u) {
          load_vec<T, V>(col + (r + u * RP) * C, v[u]);
          load_vec<T, V>(gcol + (r + u * RP) * C, d[u]);
        }
#pragma unroll
        for (int u = 0; u < kUnrollBwdNhwc; ++u)
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const float xhat = fmaf(v[u][j], rc[j].r, rc[j].u);
            const float dz = dz_of(d[u][j], xhat, rc[j].w, rc[j].b, act);
            sa[j] += dz;
            sb[j] += dz * xhat;
            sx[j] += xhat;
          }
      }
      for (; r < br.end; r += RP) {
        float v[V], d[V];
        load_vec<T, V>(col + r * C, v);
        load_vec<T, V>(gcol + r * C, d);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float xhat = fmaf(v[j], rc[j].r, rc[j].u);
          const float dz = dz_of(d[j], xhat, rc[j].w, rc[j].b, act);
          sa[j] += dz;
          sb[j] += dz * xhat;
          sx[j] += xhat;
        }
      }
    }
    __syncthreads();
    if (br.tr < RP) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int at = br.tr * width + br.tv * V + j;
        smem[at] = sa[j];
        smem[RP * width + at] = sb[j];
        smem[2 * RP * width + at] = sx[j];
      }
    }
    __syncthreads();
    if (br.tr == 0 && vi < nvec) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float a = 0.f, bb = 0.f, xx = 0.f;
        for (int rr = 0; rr < RP; ++rr) {
          const int at = rr * width + br.tv * V + j;
          a += smem[at];
          bb += smem[RP * width + at];
          xx += smem[2 * RP * width + at];
        }
        const int64_t out = (br.n * K + br.k) * C + vi * V + j;
        pa[out] = a;
        pb[out] = bb;
        px[out] = xx;
      }
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
bwd_apply_nhwc(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, const float* __restrict__ mean,
               const float* __restrict__ rstd, const float* __restrict__ c1, const float* __restrict__ c2, Param w,
               Param b, Param temb, int64_t C, int64_t G, int64_t CG, int64_t HW, int K, int64_t L, int VX, int RP,
               bool act) {
  const BlockRows br = block_rows(K, HW, L, VX);
  if (br.tr >= RP) return;
  const int64_t nvec = C / V;
  const int64_t sample = br.n * HW * C;
  for (int64_t vi = br.tv; vi < nvec; vi += VX) {
    RowCoef rc[V];
    float k_dz[V], k_x[V], k_0[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t c = vi * V + j;
      rc[j] = row_coef<T>(br.n, c, C, G, CG, mean, rstd, w, b, temb);
      const int64_t grp = br.n * G + c / CG;
      k_dz[j] = rc[j].r * rc[j].w;
      k_x[j] = -rc[j].r * c2[grp];
      k_0[j] = -rc[j].r * c1[grp];
    }
    const T* col = x + sample + vi * V;
    const T* gcol = dy + sample + vi * V;
    T* out = dx + sample + vi * V;
    int64_t r = br.start + br.tr;
    for (; r + (kUnrollBwdNhwc - 1) * RP < br.end; r += kUnrollBwdNhwc * RP) {
      float v[kUnrollBwdNhwc][V], d[kUnrollBwdNhwc][V];
#pragma unroll
      for (int u = 0; u < kUnrollBwdNhwc; ++u) {
        load_vec<T, V>(col + (r + u * RP) * C, v[u]);
        load_vec<T, V>(gcol + (r + u * RP) * C, d[u]);
      }
#pragma unroll
      for (int u = 0; u < kUnrollBwdNhwc; ++u) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float xhat = fmaf(v[u][j], rc[j].r, rc[j].u);
          const float dz = dz_of(d[u][j], xhat, rc[j].w, rc[j].b, act);
          v[u][j] = fmaf(dz, k_dz[j], fmaf(xhat, k_x[j], k_0[j]));
        }
        store_vec<T, V>(out + (r + u * RP) * C, v[u]);
      }
    }
    for (; r < br.end; r += RP) {
      float v[V], d[V];
      load_vec<T, V>(col + r * C, v);
      load_vec<T, V>(gcol + r * C, d);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float xhat = fmaf(v[j], rc[j].r, rc[j].u);
        const float dz = dz_of(d[j], xhat, rc[j].w, rc[j].b, act);
        v[j] = fmaf(dz, k_dz[j], fmaf(xhat, k_x[j], k_0[j]));
      }
      store_vec<T, V>(out + r * C, v);
    }
  }
}

// ============================================================================================== finalize
// Chunk k of a sample covers min(L, HW - k L) spatial positions.
__device__ __forceinline__ float chunk_count(int64_t k, int64_t L, int64_t HW) {
  return static_cast<float>(min(L, HW - k * L));
}

// One block per (n, g): merge K * CG per-channel chunk partials (mean, M2) of x into the group's mean / rstd
// of y = x + temb (a per-channel constant only moves each channel's mean), then per-channel a, s.
template <typename T>
__global__ void __launch_bounds__(kThreads)
finalize_fwd(const float* __restrict__ pmean, const float* __restrict__ pm2, Param temb, Param w, Param b,
             float* __restrict__ mean_out, float* __restrict__ rstd_out, float2* __restrict__ coef, int64_t C,
             int64_t HW, int64_t G, int64_t CG, int K, int64_t L, float eps) {
  __shared__ float shared[32];
  const int64_t n = blockIdx.x / G, g = blockIdx.x - n * G, c0 = g * CG;
  const int64_t entries = static_cast<int64_t>(K) * CG;
  const float total = static_cast<float>(CG) * static_cast<float>(HW);
  float acc = 0.f;
  for (int64_t e = threadIdx.x; e < entries; e += blockDim.x) {
    const int64_t k = e / CG, c = c0 + (e - k * CG);
    acc += chunk_count(k, L, HW) * (pmean[(n * K + k) * C + c] + load_param<T>(temb, n * C + c, 0.f));
  }
  const float mean = block_sum(acc, shared) / total;
  acc = 0.f;
  for (int64_t e = threadIdx.x; e < entries; e += blockDim.x) {
    const int64_t k = e / CG, c = c0 + (e - k * CG);
    const int64_t at = (n * K + k) * C + c;
    const float d = pmean[at] + load_param<T>(temb, n * C + c, 0.f) - mean;
    acc += pm2[at] + chunk_count(k, L, HW) * d * d;
  }
  const float var = block_sum(acc, shared) / total;
  const float rstd = rsqrtf(var + eps);
  if (threadIdx.x == 0) {
    mean_out[blockIdx.x] = mean;
    rstd_out[blockIdx.x] = rstd;
  }
  for (int64_t j = threadIdx.x; j < CG; j += blockDim.x) {
    const int64_t c = c0 + j;
    const float a = rstd * load_param<T>(w, c, 1.f);
    const float s = load_param<T>(b, c, 0.f) + (load_param<T>(temb, n * C + c, 0.f) - mean) * a;
    coef[n * C + c] = make_float2(a, s);
  }
}

// One block per (n, g): c1, c2 of the group; per channel the chunk sums SA (dbias), SB (dweight) and dtemb.
// With N == 1 dweight / dbias are written here directly; otherwise SA / SB go to colsum_params.
template <typename T>
__global__ void __launch_bounds__(kThreads)
finalize_bwd(const float* __restrict__ pa, const float* __restrict__ pb, const float* __restrict__ px,
             const float* __restrict__ rstd, Param w, float* __restrict__ c1_out, float* __restrict__ c2_out,
             float* __restrict__ sa_out, float* __restrict__ sb_out, void* dtemb, bool dtemb_f32, void* dw,
             bool dw_f32, void* db, bool db_f32, bool direct, int64_t C, int64_t HW, int64_t G, int64_t CG, int K) {
  __shared__ float shared[3 * kThreads];
  const int64_t n = blockIdx.x / G, g = blockIdx.x - n * G, c0 = g * CG;
  const int64_t entries = static_cast<int64_t>(K) * CG;
  const float total = static_cast<float>(CG) * static_cast<float>(HW);
  float acc_a = 0.f, acc_b = 0.f;
  for (int64_t e = threadIdx.x; e < entries; e += blockDim.x) {
    const int64_t k = e / CG, c = c0 + (e - k * CG);
    const int64_t at = (n * K + k) * C + c;
    const float wc = load_param<T>(w, c, 1.f);
    acc_a += wc * pa[at];
    acc_b += wc * pb[at];
  }
  const float c1 = block_sum(acc_a, shared) / total;
  const float c2 = block_sum(acc_b, shared) / total;
  const float r = rstd[blockIdx.x];
  if (threadIdx.x == 0) {
    c1_out[blockIdx.x] = c1;
    c2_out[blockIdx.x] = c2;
  }
  // Per-channel sums over the K chunks: JW channel lanes x KR chunk rows, reduced in shared memory.
  const int JW = CG < 32 ? static_cast<int>(CG) : 32;
  const int KR = blockDim.x / JW;
  const int jt = threadIdx.x % JW, kt = threadIdx.x / JW;
  for (int64_t j0 = 0; j0 < CG; j0 += JW) {
    const int64_t c = c0 + j0 + jt;
    float sa = 0.f, sb = 0.f, sx = 0.f;
    if (kt < KR && j0 + jt < CG) {
      for (int64_t k = kt; k < K; k += KR) {
        const int64_t at = (n * K + k) * C + c;
        sa += pa[at];
        sb += pb[at];
        sx += px[at];
      }
    }
    __syncthreads();
    shared[threadIdx.x] = sa;
    shared[kThreads + threadIdx.x] = sb;
    shared[2 * kThreads + threadIdx.x] = sx;
    __syncthreads();
    if (kt == 0 && j0 + jt < CG) {
      for (int kk = 1; kk < KR; ++kk) {
        sa += shared[kk * JW + jt];
        sb += shared[kThreads + kk * JW + jt];
        sx += shared[2 * kThreads + kk * JW + jt];
      }
      sa_out[n * C + c] = sa;
      sb_out[n * C + c] = sb;
      if (dtemb != nullptr) {
        const float wa = load_param<T>(w, c, 1.f) * sa;
        store_param<T>(dtemb, dtemb_f32, n * C + c, r * (wa - static_cast<float>(HW) * c1 - c2 * sx));
      }
      if (direct) {
        if (dw != nullptr) store_param<T>(dw, dw_f32, c, sb);
        if (db != nullptr) store_param<T>(db, db_f32, c, sa);
      }
    }
  }
}

// dweight[c] = sum_n SB[n, c], dbias[c] = sum_n SA[n, c] (N > 1).
template <typename T>
__global__ void __launch_bounds__(kThreads)
colsum_params(const float* __restrict__ sa, const float* __restrict__ sb, void* dw, bool dw_f32, void* db,
              bool db_f32, int64_t N, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float a = 0.f, bb = 0.f;
  for (int64_t n = 0; n < N; ++n) {
    a += sa[n * C + c];
    bb += sb[n * C + c];
  }
  if (dw != nullptr) store_param<T>(dw, dw_f32, c, bb);
  if (db != nullptr) store_param<T>(db, db_f32, c, a);
}

// ================================================================================================== host
int num_sms(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) device = 0;
  if (cache[device] == 0) {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[device] = std::max(count, 1);
  }
  return cache[device];
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Plan {
  int64_t N, C, HW, G, CG;
  bool nhwc, vec;
  int V;          // elements per access (16 bytes / element size, or 1)
  int K;          // spatial chunks per sample
  int64_t L;      // chunk length (positions)
  int VX, RP;     // NHWC thread layout
};

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

Plan make_plan(const at::Tensor& x, int64_t num_groups, bool nhwc, bool pointers_aligned) {
  Plan p;
  p.N = x.size(0);
  p.C = x.size(1);
  p.HW = p.N * p.C > 0 ? x.numel() / (p.N * p.C) : 0;
  p.G = num_groups;
  p.CG = p.C / num_groups;
  p.nhwc = nhwc;
  const int width = 16 / static_cast<int>(x.element_size());
  p.vec = pointers_aligned && (nhwc ? p.C % width == 0 : p.HW % width == 0);
  p.V = p.vec ? width : 1;
  const int sms = num_sms(x.get_device());
  if (!nhwc) {
    // a warp per (row, chunk): ~48 warps per SM in total, chunks of >= 2 vector loads per lane
    const int64_t rows = p.N * p.C;
    const int64_t want = ceil_div(static_cast<int64_t>(sms) * 48, std::max<int64_t>(rows, 1));
    const int64_t most = std::max<int64_t>(1, p.HW / (64 * p.V));
    const int64_t k = std::max<int64_t>(1, std::min(want, most));
    p.L = ceil_div(ceil_div(p.HW, k), p.V) * p.V;
    p.K = static_cast<int>(ceil_div(p.HW, p.L));
    p.VX = p.RP = 0;
  } else {
    const int64_t nvec = p.C / p.V;
    p.VX = static_cast<int>(std::min<int64_t>(nvec, kThreads));
    p.RP = std::max(1, kThreads / p.VX);
    // ~2 blocks per SM in total, >= kUnroll rows per thread
    const int64_t want = ceil_div(2 * static_cast<int64_t>(sms), std::max<int64_t>(p.N, 1));
    const int64_t most = std::max<int64_t>(1, p.HW / (static_cast<int64_t>(p.RP) * kUnroll));
    const int64_t k = std::max<int64_t>(1, std::min(want, most));
    p.L = ceil_div(p.HW, k);
    p.K = static_cast<int>(ceil_div(p.HW, p.L));
  }
  return p;
}

Param param_of(const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return Param{nullptr, false};
  return Param{t->data_ptr(), t->scalar_type() == at::kFloat};
}

template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* name, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", dtype, " (float32, float16, bfloat16)");
  }
}

bool is_nhwc(const at::Tensor& x) {
  if (x.dim() <= 2 || x.is_contiguous()) return false;
  std::vector<int64_t> order;
  order.push_back(0);
  for (int64_t d = 2; d < x.dim(); ++d) order.push_back(d);
  order.push_back(1);
  return x.permute(order).is_contiguous();
}

void check_inputs(const char* name, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& temb, int64_t num_groups) {
  TORCH_CHECK(x.is_cuda(), name, ": x must be a CUDA tensor");
  TORCH_CHECK(x.dim() >= 2, name, ": x must be (N, C, *spatial), got ", x.sizes());
  TORCH_CHECK(num_groups > 0 && x.size(1) % num_groups == 0, name, ": C=", x.size(1),
              " is not divisible by num_groups=", num_groups);
  TORCH_CHECK(x.is_contiguous() || is_nhwc(x), name, ": x must be contiguous NCHW or dense channels_last");
  const auto check_param = [&](const std::optional<at::Tensor>& t, const char* what, at::IntArrayRef shape) {
    if (!t.has_value() || !t->defined()) return;
    TORCH_CHECK(t->device() == x.device(), name, ": ", what, " is on ", t->device(), ", x on ", x.device());
    TORCH_CHECK(t->scalar_type() == x.scalar_type() || t->scalar_type() == at::kFloat, name, ": ", what,
                " must have x's dtype or float32, got ", t->scalar_type());
    TORCH_CHECK(t->sizes() == shape, name, ": ", what, " must have shape ", shape, ", got ", t->sizes());
    TORCH_CHECK(t->is_contiguous(), name, ": ", what, " must be contiguous");
  };
  const int64_t C = x.size(1), N = x.size(0);
  check_param(weight, "weight", {C});
  check_param(bias, "bias", {C});
  check_param(temb, "temb", {N, C});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_fwd(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   const std::optional<at::Tensor>& temb,
                                                                   int64_t num_groups, double eps, bool act) {
  const char* name = "group_norm_silu_fwd";
  check_inputs(name, x, weight, bias, temb, num_groups);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor out = at::empty_strided(x.sizes(), x.strides(), x.options());
  const auto f32 = x.options().dtype(at::kFloat);
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor mean = at::empty({N, num_groups}, f32);
  at::Tensor rstd = at::empty({N, num_groups}, f32);
  if (x.numel() == 0) {
    mean.zero_();
    rstd.zero_();
    return {out, mean, rstd};
  }
  const bool nhwc = is_nhwc(x);
  const Plan p = make_plan(x, num_groups, nhwc, aligned16(x) && aligned16(out));
  at::Tensor pmean = at::empty({N, p.K, C}, f32);
  at::Tensor pm2 = at::empty({N, p.K, C}, f32);
  at::Tensor coef = at::empty({N, C, 2}, f32);
  const Param pw = param_of(weight), pb = param_of(bias), pt = param_of(temb);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(x.scalar_type(), name, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x.data_ptr());
    T* yp = static_cast<T*>(out.data_ptr());
    float2* cp = reinterpret_cast<float2*>(coef.data_ptr<float>());
    const auto launch = [&](auto vtag) {
      constexpr int V = decltype(vtag)::value;
      if (!nhwc) {
        const int64_t rows = N * C;
        const int64_t blocks = ceil_div(rows * p.K, kWarpsPerBlock);
        stats_nchw<T, V><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            xp, pmean.data_ptr<float>(), pm2.data_ptr<float>(), rows, C, p.HW, p.K, p.L);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        finalize_fwd<T><<<static_cast<unsigned>(N * num_groups), kThreads, 0, stream>>>(
            pmean.data_ptr<float>(), pm2.data_ptr<float>(), pt, pw, pb, mean.data_ptr<float>(),
            rstd.data_ptr<float>(), cp, C, p.HW, num_groups, p.CG, p.K, p.L, static_cast<float>(eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        apply_nchw<T, V><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(xp, yp, cp, rows, p.HW, p.K, p.L,
                                                                                act);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        const int64_t blocks = N * p.K;
        const int threads = p.VX * p.RP;
        const size_t smem = sizeof(float) * 2 * p.RP * p.VX * V;
        stats_nhwc<T, V><<<static_cast<unsigned>(blocks), threads, smem, stream>>>(
            xp, pmean.data_ptr<float>(), pm2.data_ptr<float>(), C, p.HW, p.K, p.L, p.VX, p.RP);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        finalize_fwd<T><<<static_cast<unsigned>(N * num_groups), kThreads, 0, stream>>>(
            pmean.data_ptr<float>(), pm2.data_ptr<float>(), pt, pw, pb, mean.data_ptr<float>(),
            rstd.data_ptr<float>(), cp, C, p.HW, num_groups, p.CG, p.K, p.L, static_cast<float>(eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        apply_nhwc<T, V><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(xp, yp, cp, C, p.HW, p.K, p.L, p.VX,
                                                                                p.RP, act);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    };
    if (p.vec) {
      launch(std::integral_constant<int, static_cast<int>(16 / sizeof(T))>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_bwd(
    const at::Tensor& dout, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& temb, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, bool act) {
  const char* name = "group_norm_silu_bwd";
  check_inputs(name, x, weight, bias, temb, num_groups);
  TORCH_CHECK(dout.sizes() == x.sizes() && dout.strides() == x.strides() && dout.scalar_type() == x.scalar_type() &&
                  dout.device() == x.device(),
              name, ": dout must have x's shape, strides, dtype and device");
  const int64_t N = x.size(0), C = x.size(1);
  for (const at::Tensor* s : {&mean, &rstd}) {
    TORCH_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous() && s->device() == x.device() &&
                    s->numel() == N * num_groups,
                name, ": mean / rstd must be contiguous float32 [N, num_groups] on x's device");
  }
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor dx = at::empty_strided(x.sizes(), x.strides(), x.options());
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  const bool has_t = temb.has_value() && temb->defined();
  at::Tensor dw = has_w ? at::empty_like(*weight) : at::empty({0}, x.options());
  at::Tensor db = has_b ? at::empty_like(*bias) : at::empty({0}, x.options());
  at::Tensor dt = has_t ? at::empty_like(*temb) : at::empty({0}, x.options());
  if (x.numel() == 0) {
    if (has_w) dw.zero_();
    if (has_b) db.zero_();
    if (has_t) dt.zero_();
    return {dx, dw, db, dt};
  }
  const bool nhwc = is_nhwc(x);
  const Plan p = make_plan(x, num_groups, nhwc, aligned16(x) && aligned16(dout) && aligned16(dx));
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor pa = at::empty({N, p.K, C}, f32);
  at::Tensor pb = at::empty({N, p.K, C}, f32);
  at::Tensor px = at::empty({N, p.K, C}, f32);
  at::Tensor c1 = at::empty({N, num_groups}, f32);
  at::Tensor c2 = at::empty({N, num_groups}, f32);
  at::Tensor sa = at::empty({N, C}, f32);
  at::Tensor sb = at::empty({N, C}, f32);
  const Param pw = param_of(weight), pbias = param_of(bias), pt = param_of(temb);
  const bool direct = N == 1;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(x.scalar_type(), name, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x.data_ptr());
    const T* gp = static_cast<const T*>(dout.data_ptr());
    T* dxp = static_cast<T*>(dx.data_ptr());
    const auto launch = [&](auto vtag) {
      constexpr int V = decltype(vtag)::value;
      const int64_t rows = N * C;
      const int64_t nchw_blocks = ceil_div(rows * p.K, kWarpsPerBlock);
      const int64_t nhwc_blocks = N * p.K;
      const int threads = nhwc ? p.VX * p.RP : kThreads;
      if (!nhwc) {
        bwd_reduce_nchw<T, V><<<static_cast<unsigned>(nchw_blocks), kThreads, 0, stream>>>(
            xp, gp, mean.data_ptr<float>(), rstd.data_ptr<float>(), pw, pbias, pt, pa.data_ptr<float>(),
            pb.data_ptr<float>(), px.data_ptr<float>(), rows, C, num_groups, p.CG, p.HW, p.K, p.L, act);
      } else {
        const size_t smem = sizeof(float) * 3 * p.RP * p.VX * V;
        bwd_reduce_nhwc<T, V><<<static_cast<unsigned>(nhwc_blocks), threads, smem, stream>>>(
            xp, gp, mean.data_ptr<float>(), rstd.data_ptr<float>(), pw, pbias, pt, pa.data_ptr<float>(),
            pb.data_ptr<float>(), px.data_ptr<float>(), C, num_groups, p.CG, p.HW, p.K, p.L, p.VX, p.RP, act);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      finalize_bwd<T><<<static_cast<unsigned>(N * num_groups), kThreads, 0, stream>>>(
          pa.data_ptr<float>(), pb.data_ptr<float>(), px.data_ptr<float>(), rstd.data_ptr<float>(), pw,
          c1.data_ptr<float>(), c2.data_ptr<float>(), sa.data_ptr<float>(), sb.data_ptr<float>(),
          has_t ? dt.data_ptr() : nullptr, has_t && dt.scalar_type() == at::kFloat, has_w ? dw.data_ptr() : nullptr,
          has_w && dw.scalar_type() == at::kFloat, has_b ? db.data_ptr() : nullptr,
          has_b && db.scalar_type() == at::kFloat, direct, C, p.HW, num_groups, p.CG, p.K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (!direct && (has_w || has_b)) {
        colsum_params<T><<<static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, 0, stream>>>(
            sa.data_ptr<float>(), sb.data_ptr<float>(), has_w ? dw.data_ptr() : nullptr,
            has_w && dw.scalar_type() == at::kFloat, has_b ? db.data_ptr() : nullptr,
            has_b && db.scalar_type() == at::kFloat, N, C);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (!nhwc) {
        bwd_apply_nchw<T, V><<<static_cast<unsigned>(nchw_blocks), kThreads, 0, stream>>>(
            xp, gp, dxp, mean.data_ptr<float>(), rstd.data_ptr<float>(), c1.data_ptr<float>(), c2.data_ptr<float>(),
            pw, pbias, pt, rows, C, num_groups, p.CG, p.HW, p.K, p.L, act);
      } else {
        bwd_apply_nhwc<T, V><<<static_cast<unsigned>(nhwc_blocks), threads, 0, stream>>>(
            xp, gp, dxp, mean.data_ptr<float>(), rstd.data_ptr<float>(), c1.data_ptr<float>(), c2.data_ptr<float>(),
            pw, pbias, pt, C, num_groups, p.CG, p.HW, p.K, p.L, p.VX, p.RP, act);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (p.vec) {
      launch(std::integral_constant<int, static_cast<int>(16 / sizeof(T))>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return {dx, dw, db, dt};
}

}  // namespace
}  // namespace group_norm
}  // namespace nitrokernels

TORCH_LIBRARY_FRAGMENT(nitrokernels_cuda, m) {
  m.def(
      "group_norm_silu_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? temb, int num_groups, float eps, "
      "bool act) -> (Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_silu_bwd(Tensor dout, Tensor x, Tensor? weight, Tensor? bias, Tensor? temb, Tensor mean, "
      "Tensor rstd, int num_groups, bool act) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nitrokernels_cuda, CUDA, m) {
  m.impl("group_norm_silu_fwd", &nitrokernels::group_norm::group_norm_silu_fwd);
  m.impl("group_norm_silu_bwd", &nitrokernels::group_norm::group_norm_silu_bwd);
}
