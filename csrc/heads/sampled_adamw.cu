// Sampled AdamW: one multi-tensor launch that applies AdamW to the rows (heads) of pooled parameters
// that received gradients, by row index. Registered as torch.ops.nitrokernels_cuda.sampled_adamw_;
// nitrokernels/ops/optim.py defines the semantics and holds the eager reference.
//
// Per parameter p [P, R] (viewed flat per row) the caller passes
//   values [n, R]  gradient rows (sparse COO values, or the dense gradient with n = P),
//   rows   [n]     int64 row of each entry, SORTED ascending (repeats allowed),
//   perm   [n]     int64 entry -> index into values (the sort permutation), or None for identity,
//   exp_avg, exp_avg_sq [P, R] in the math type (float for float/half/bfloat16, double for double),
//   master [P, R] float32 master rows for half/bfloat16 params, or None (the param is its own master),
//   step [P] float32 (per-row step counters).
// Repeated rows are summed: the first entry of each run of equal rows does the update with the run's sum,
// the others do nothing, so the entry count stays fixed and nothing syncs with the host (graph-capturable).
// The sum runs sequentially over the run in sorted order; the caller sorts stably, so that is the entry
// order: deterministic, and the eager reference's order. A master element whose rounding differs from the
// param (the param was written behind the optimiser's back) is re-read from the param first.
// Kernel 1 updates param / moments reading step+1; kernel 2 then increments the step of each run once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace nitrokernels {
namespace {

constexpr int kMaxTensors = 24;   // per launch; kernel arguments stay well under 4 KiB
constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;  // elements of one row handled by one block

template <typename scalar_t>
struct Batch {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* param[kMaxTensors];
  const scalar_t* values[kMaxTensors];
  opmath_t* exp_avg[kMaxTensors];
  opmath_t* exp_avg_sq[kMaxTensors];
  float* master[kMaxTensors];       // nullptr: the param is its own master
  float* step[kMaxTensors];
  const int64_t* rows[kMaxTensors];
  const int64_t* perm[kMaxTensors];
  int64_t entries[kMaxTensors];
  int64_t row_numel[kMaxTensors];
  int64_t chunks[kMaxTensors];      // blocks per entry
  int64_t block_end[kMaxTensors];   // cumulative blocks (kernel 1)
  int64_t entry_end[kMaxTensors];   // cumulative entries (kernel 2)
  int count;
};

struct Hyper {
  double lr, beta1, beta2, eps, weight_decay;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sampled_adamw_update_kernel(Batch<scalar_t> b, Hyper h) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t block = blockIdx.x;
  int t = 0;
  while (t + 1 < b.count && block >= b.block_end[t]) ++t;
  const int64_t local = block - (t > 0 ? b.block_end[t - 1] : 0);
  const int64_t entry = local / b.chunks[t];
  const int64_t chunk = local - entry * b.chunks[t];
  const int64_t* rows = b.rows[t];
  const int64_t row = rows[entry];
  if (entry > 0 && rows[entry - 1] == row) return;  // not the first of its run: the first one sums it
  int64_t run_end = entry + 1;
  while (run_end < b.entries[t] && rows[run_end] == row) ++run_end;

  const int64_t R = b.row_numel[t];
  const int64_t start = chunk * kChunk;
  const int64_t end = start + kChunk < R ? start + kChunk : R;
  const int64_t* perm = b.perm[t];
  const scalar_t* values = b.values[t];
  scalar_t* p = b.param[t] + row * R;
  opmath_t* m = b.exp_avg[t] + row * R;
  opmath_t* v = b.exp_avg_sq[t] + row * R;
  float* w = b.master[t] != nullptr ? b.master[t] + row * R : nullptr;

  // Bias corrections in double, as torch does with its Python-float step.
  const double step = static_cast<double>(b.step[t][row]) + 1.0;
  const double bias_correction1 = 1.0 - pow(h.beta1, step);
  const double bias_correction2_sqrt = sqrt(1.0 - pow(h.beta2, step));
  const opmath_t step_size = static_cast<opmath_t>(h.lr / bias_correction1);
  const opmath_t bc2_sqrt = static_cast<opmath_t>(bias_correction2_sqrt);
  const opmath_t decay = static_cast<opmath_t>(1.0 - h.lr * h.weight_decay);
  const opmath_t one_minus_beta1 = static_cast<opmath_t>(1.0 - h.beta1);
  const opmath_t beta2 = static_cast<opmath_t>(h.beta2);
  const opmath_t one_minus_beta2 = static_cast<opmath_t>(1.0 - h.beta2);
  const opmath_t eps = static_cast<opmath_t>(h.eps);

  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    opmath_t g = 0;
    for (int64_t j = entry; j < run_end; ++j) {
      const int64_t src = perm != nullptr ? perm[j] : j;
      g += static_cast<opmath_t>(values[src * R + i]);
    }
    opmath_t param = static_cast<opmath_t>(p[i]);
    if (w != nullptr) {   // the master, unless its rounding is no longer the param (written behind our back)
      const float master = w[i];
      if (static_cast<opmath_t>(static_cast<scalar_t>(master)) == param) param = static_cast<opmath_t>(master);
    }
    param = param * decay;
    opmath_t exp_avg = m[i];
    exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg);
    const opmath_t exp_avg_sq = beta2 * v[i] + one_minus_beta2 * g * g;
    const opmath_t denom = sqrt(exp_avg_sq) / bc2_sqrt + eps;
    param -= step_size * exp_avg / denom;
    p[i] = static_cast<scalar_t>(param);
    if (w != nullptr) w[i] = static_cast<float>(param);
    m[i] = exp_avg;
    v[i] = exp_avg_sq;
  }
}

template <typename scalar_t>
__global__ void sampled_adamw_step_kernel(Batch<scalar_t> b) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= b.entry_end[b.count - 1]) return;
  int t = 0;
  while (t + 1 < b.count && index >= b.entry_end[t]) ++t;
  const int64_t entry = index - (t > 0 ? b.entry_end[t - 1] : 0);
  const int64_t* rows = b.rows[t];
  if (entry > 0 && rows[entry - 1] == rows[entry]) return;
  b.step[t][rows[entry]] += 1.0f;
}

struct Item {
  at::Tensor param, values, rows, exp_avg, exp_avg_sq, step;
  std::optional<at::Tensor> perm, master;
};

template <typename scalar_t>
void launch(const std::vector<Item>& items, const Hyper& h, cudaStream_t stream) {
  using opmath_t = at::opmath_type<scalar_t>;
  Batch<scalar_t> b;
  b.count = static_cast<int>(items.size());
  int64_t blocks = 0, entries = 0;
  for (int t = 0; t < b.count; ++t) {
    const Item& it = items[t];
    b.param[t] = it.param.data_ptr<scalar_t>();
    b.values[t] = it.values.data_ptr<scalar_t>();
    b.exp_avg[t] = it.exp_avg.data_ptr<opmath_t>();
    b.exp_avg_sq[t] = it.exp_avg_sq.data_ptr<opmath_t>();
    b.master[t] = it.master.has_value() ? it.master->data_ptr<float>() : nullptr;
    b.step[t] = it.step.data_ptr<float>();
    b.rows[t] = it.rows.data_ptr<int64_t>();
    b.perm[t] = it.perm.has_value() ? it.perm->data_ptr<int64_t>() : nullptr;
    b.entries[t] = it.rows.numel();
    b.row_numel[t] = it.param.numel() / it.param.size(0);
    b.chunks[t] = std::max<int64_t>(1, (b.row_numel[t] + kChunk - 1) / kChunk);
    blocks += b.entries[t] * b.chunks[t];
    entries += b.entries[t];
    b.block_end[t] = blocks;
    b.entry_end[t] = entries;
  }
  if (entries == 0) return;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "sampled_adamw_: too many blocks (", blocks, ")");
  sampled_adamw_update_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(b, h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t step_blocks = (entries + kThreads - 1) / kThreads;
  sampled_adamw_step_kernel<scalar_t><<<static_cast<unsigned>(step_blocks), kThreads, 0, stream>>>(b);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void sampled_adamw_cuda(at::TensorList params, at::TensorList values, at::TensorList rows,
                        const c10::List<std::optional<at::Tensor>>& perms, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList steps,
                        const c10::List<std::optional<at::Tensor>>& masters, double lr, double beta1, double beta2,
                        double eps, double weight_decay) {
  const size_t n = params.size();
  TORCH_CHECK(values.size() == n && rows.size() == n && perms.size() == n && exp_avgs.size() == n &&
                  exp_avg_sqs.size() == n && steps.size() == n && masters.size() == n,
              "sampled_adamw_: all lists must have the same length");
  if (n == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(params[0].device());
  std::vector<Item> items;
  items.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.is_cuda() && p.dim() >= 1 && p.is_contiguous(), "sampled_adamw_: param ", i,
                " must be a contiguous CUDA tensor with at least one dim");
    TORCH_CHECK(p.device() == params[0].device(), "sampled_adamw_: all params must be on one device");
    const int64_t R = p.numel() / std::max<int64_t>(1, p.size(0));
    const bool half = p.scalar_type() == at::kHalf || p.scalar_type() == at::kBFloat16;
    const auto state_type = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    for (const at::Tensor* s : {&exp_avgs[i], &exp_avg_sqs[i]}) {
      TORCH_CHECK(s->device() == p.device() && s->scalar_type() == state_type && s->is_contiguous() &&
                      s->sizes() == p.sizes(),
                  "sampled_adamw_: moments ", i, " must be contiguous ", state_type,
                  " tensors of the param's shape on its device");
    }
    std::optional<at::Tensor> master = masters.get(i);
    TORCH_CHECK(master.has_value() == half, "sampled_adamw_: param ", i, " (", p.scalar_type(), ") ",
                half ? "needs its float32 master rows" : "takes no master rows");
    if (master.has_value()) {
      TORCH_CHECK(master->device() == p.device() && master->scalar_type() == at::kFloat &&
                      master->is_contiguous() && master->sizes() == p.sizes(),
                  "sampled_adamw_: master ", i, " must be a contiguous float32 tensor of the param's shape");
    }
    TORCH_CHECK(steps[i].device() == p.device() && steps[i].scalar_type() == at::kFloat && steps[i].dim() == 1 &&
                    steps[i].size(0) == p.size(0) && steps[i].is_contiguous(),
                "sampled_adamw_: steps ", i, " must be a contiguous float32 [", p.size(0), "] tensor on ", p.device());
    const at::Tensor& r = rows[i];
    TORCH_CHECK(r.device() == p.device() && r.scalar_type() == at::kLong && r.dim() == 1 && r.is_contiguous(),
                "sampled_adamw_: rows ", i, " must be a contiguous int64 vector on the param's device");
    const at::Tensor& g = values[i];
    TORCH_CHECK(g.device() == p.device() && g.scalar_type() == p.scalar_type() && g.is_contiguous() &&
                    g.dim() >= 1 && g.size(0) == r.size(0) && g.numel() == r.size(0) * R,
                "sampled_adamw_: values ", i, " must be contiguous [", r.size(0), ", ...] rows of the param (dtype ",
                p.scalar_type(), ")");
    std::optional<at::Tensor> perm = perms.get(i);
    if (perm.has_value()) {
      TORCH_CHECK(perm->device() == p.device() && perm->scalar_type() == at::kLong && perm->is_contiguous() &&
                      perm->dim() == 1 && perm->size(0) == r.size(0),
                  "sampled_adamw_: perm ", i, " must be a contiguous int64 [", r.size(0), "] tensor");
    }
    if (r.numel() == 0 || R == 0) continue;
    items.push_back(Item{p, g, r, exp_avgs[i], exp_avg_sqs[i], steps[i], perm, master});
  }
  const Hyper h{lr, beta1, beta2, eps, weight_decay};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Launch batches of consecutive same-dtype tensors.
  size_t begin = 0;
  while (begin < items.size()) {
    size_t end = begin + 1;
    const auto dtype = items[begin].param.scalar_type();
    while (end < items.size() && end - begin < static_cast<size_t>(kMaxTensors) &&
           items[end].param.scalar_type() == dtype) {
      ++end;
    }
    std::vector<Item> batch(items.begin() + begin, items.begin() + end);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sampled_adamw_cuda",
                                    [&] { launch<scalar_t>(batch, h, stream); });
    begin = end;
  }
}

}  // namespace
}  // namespace nitrokernels

TORCH_LIBRARY_FRAGMENT(nitrokernels_cuda, m) {
  m.def(
      "sampled_adamw_(Tensor(a!)[] params, Tensor[] values, Tensor[] rows, Tensor?[] perms, "
      "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor(e!)?[] masters, float lr, "
      "float beta1, float beta2, float eps, float weight_decay) -> ()");
}

TORCH_LIBRARY_IMPL(nitrokernels_cuda, CUDA, m) {
  m.impl("sampled_adamw_", &nitrokernels::sampled_adamw_cuda);
}
