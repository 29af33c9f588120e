"""Run a csrc/**/*.cu file's kernels on the CPU, to test CUDA C++ kernel logic where there is no GPU.

`build(cu_path)` rewrites the source for the host compiler and returns a shared library to load with
`torch.ops.load_library`; the ops then appear as torch.ops.<namespace>.* (default emu_<file stem>, e.g.
torch.ops.emu_group_norm_silu) for CPU tensors. Every CUDA thread of a block becomes a std::thread (blocks run
one after another), so __syncthreads (std::barrier per block), warp shuffles (a barrier per warp) and static /
dynamic shared memory behave as on a GPU, including races between threads. The rewrite: kernel<<<grid, block, smem, stream>>>(...)
becomes emu::launch(...); CUDA headers, device guards and streams are dropped; TORCH_LIBRARY_FRAGMENT
(nitrokernels_cuda) becomes TORCH_LIBRARY(<namespace>) with CPU kernels. Kernels must declare dynamic shared
memory through NK_DYNAMIC_SMEM(name) and use only 1-D grids and blocks.

What it cannot show: speed, memory coalescing, 16-byte alignment faults, or anything about real warps
diverging; compile-checking with nvcc (python -m nitrokernels.build_check) covers the device compiler.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile

import torch

PRELUDE = r'''
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(8) float2 { float x, y; };
inline float2 make_float2(float a, float b) { return float2{a, b}; }
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
using cudaStream_t = void*;
namespace emu {
inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<float> shuffle;
inline std::vector<float> dynamic_smem;
template <typename... P, typename... A>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, void (*kernel)(P...), A... args) {
  grid_dim = grid; block_dim = block;
  const int threads = block.x;
  dynamic_smem.assign(smem / sizeof(float) + 1, std::nanf(""));
  shuffle.assign(threads, 0.f);
  for (unsigned b = 0; b < grid.x; ++b) {
    std::barrier<> bar(threads);
    block_barrier = &bar;
    warp_barriers.clear();
    for (int w = 0; w * 32 < threads; ++w)
      warp_barriers.emplace_back(new std::barrier<>(std::min(32, threads - w * 32)));
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t, b] {
        thread_idx = dim3(t); block_idx = dim3(b);
        kernel(static_cast<P>(args)...);
        warp_barriers[t / 32]->arrive_and_drop();
        bar.arrive_and_drop();
      });
    for (auto& th : pool) th.join();
  }
}
}  // namespace emu
#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__
#define __shared__ static
#define NK_DYNAMIC_SMEM(name) float* name = emu::dynamic_smem.data()
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#define C10_CUDA_CHECK(x) ((void)(x))
inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
  const int t = threadIdx.x, w = t / 32;
  emu::shuffle[t] = v;
  emu::warp_barriers[w]->arrive_and_wait();
  const float r = emu::shuffle[w * 32 + ((t % 32) ^ o)];
  emu::warp_barriers[w]->arrive_and_wait();
  return r;
}
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
using std::min; using std::max;
enum { cudaDevAttrMultiProcessorCount = 16 };
inline int cudaDeviceGetAttribute(int* value, int, int) { *value = 3; return 0; }
'''


def available() -> str | None:
    """None when the emulation can be built here, else why not."""
    if shutil.which("g++") is None:
        return "g++ not found"
    if not os.path.isdir(os.path.join(os.path.dirname(torch.__file__), "include", "ATen")):
        return "torch C++ headers not installed"
    return None


def transform(source: str, namespace: str) -> str:
    """The .cu source rewritten as host C++ with the emulation prelude in front."""
    s = re.sub(r"#include <(c10/cuda/[^>]*|cuda_runtime\.h|cuda_fp16\.h|cuda_bf16\.h)>\n", "", source)
    s = re.sub(r"\s*const c10::cuda::OptionalCUDAGuard guard\([^;]*\);", "", s)
    s = s.replace("c10::cuda::getCurrentCUDAStream()", "nullptr")
    s = re.sub(r"\b\w+\.is_cuda\(\)", "true", s)
    # kernel<<<grid, block, smem, stream>>>(args)  ->  emu::launch(grid, block, smem, stream, &kernel, args)
    s = re.sub(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)<<<(.+?)>>>\(", r"emu::launch(\2, &\1, ", s, flags=re.S)
    s = s.replace("TORCH_LIBRARY_FRAGMENT(nitrokernels_cuda,", f"TORCH_LIBRARY({namespace},")
    s = s.replace("TORCH_LIBRARY_IMPL(nitrokernels_cuda, CUDA,", f"TORCH_LIBRARY_IMPL({namespace}, CPU,")
    return PRELUDE + s


def default_namespace(cu_path: str) -> str:
    """torch.ops namespace of a source's emulated ops: emu_<file stem> (one TORCH_LIBRARY per namespace)."""
    return "emu_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(cu_path))[0])


def build(cu_path: str, build_dir: str | None = None, namespace: str | None = None) -> str:
    """Compile (once per source text; cached in build_dir) and return the path of the shared library."""
    build_dir = build_dir or os.path.join(tempfile.gettempdir(), "nitrokernels_cuda_emu")
    namespace = namespace or default_namespace(cu_path)
    src = transform(open(cu_path).read(), namespace)
    os.makedirs(build_dir, exist_ok=True)
    tag = hashlib.sha1(src.encode()).hexdigest()[:12]
    so = os.path.join(build_dir, f"emu_{tag}.so")
    if not os.path.exists(so):
        cpp = os.path.join(build_dir, f"emu_{tag}.cpp")
        open(cpp, "w").write(src)
        tdir = os.path.dirname(torch.__file__)
        inc = os.path.join(tdir, "include")
        cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-w", "-pthread", cpp,
               f"-I{inc}", f"-I{os.path.join(inc, 'torch', 'csrc', 'api', 'include')}",
               f"-I{sysconfig.get_paths()['include']}", f"-L{os.path.join(tdir, 'lib')}", "-lc10", "-ltorch_cpu",
               f"-Wl,-rpath,{os.path.join(tdir, 'lib')}",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
        proc = subprocess.run(cmd + ["-o", so + ".tmp"], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"emulated build of {cu_path} failed:\n{proc.stderr[-6000:]}")
        os.replace(so + ".tmp", so)  # atomic: concurrent test runs never load a half-written library
    return so
