#pragma once
// Shared helpers of the kernel benchmarks (bench/<family>.cpp): random inputs, the timers behind
// UseManualTime, throughput counters, and the pairing of every kernel with a reference measured in
// the same process (a copy for memory-bound kernels, a vendor GEMM for compute-bound ones), so that a
// result is quoted as a fraction of what this machine can do rather than as a bare time.
//
// Counters (see bench/README.md): "B/s" bytes moved per second (reads + writes), "FLOP/s" floating point
// operations per second, "pct_of_ref" this kernel's rate as a percentage of its reference's rate; the
// label names that reference.

#include <benchmark/benchmark.h>
#include <omp.h>

#include <Eigen/Dense>
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"
#include "qlora/core/philox.hpp"
#include "qlora/cpu/random.hpp"

#if defined(QLORA_WITH_CUDA)
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "qlora/cuda/convert.hpp"
#include "qlora/cuda/random.hpp"
#include "qlora/cuda/runtime.hpp"
#endif

namespace qlora::bench {

// ---- reference pairing and counters ----------------------------------------------------------------

enum class Work { bytes, flops };

// A reference benchmark and the rate (work per second) of its latest run in this process; 0 until it has
// run (it is registered just before the kernels paired with it, so it runs first unless filtered out).
struct Reference {
  std::string name;
  Work work;
  double rate = 0;
};
using ReferencePtr = std::shared_ptr<Reference>;

inline const char* rate_counter_name(Work work) { return work == Work::bytes ? "B/s" : "FLOP/s"; }

// The rate counter: `work` per iteration over the (manual) time, shown with SI prefixes (T/s = 1e12/s).
inline void set_rate(benchmark::State& state, Work work, double work_per_iteration) {
  state.counters[rate_counter_name(work)] = benchmark::Counter(
      work_per_iteration, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::OneK::kIs1000);
}

// Ends a reference's run: its rate counter, and its rate kept for the kernels that follow.
inline void report_reference(benchmark::State& state, Reference& ref, double work_per_iteration, double seconds) {
  set_rate(state, ref.work, work_per_iteration);
  if (seconds > 0) ref.rate = work_per_iteration * double(state.iterations()) / seconds;
}

// Ends a kernel's run: its rate counter, and its rate as a percentage of the reference's.
inline void report_kernel(benchmark::State& state, const Reference& ref, double work_per_iteration, double seconds) {
  set_rate(state, ref.work, work_per_iteration);
  state.SetLabel("vs " + ref.name);
  if (ref.rate > 0 && seconds > 0)
    state.counters["pct_of_ref"] = 100.0 * work_per_iteration * double(state.iterations()) / seconds / ref.rate;
}

inline ReferencePtr make_reference(std::string name, Work work) {
  return std::make_shared<Reference>(Reference{std::move(name), work, 0});
}

// Registers a benchmark that reports its own iteration times (UseManualTime). A benchmark that throws (a
// launcher's qlora::Error, a CUDA or cuBLAS error) is reported as skipped with the message, and the
// program goes on with the others.
template <class Fn>
benchmark::internal::Benchmark* add(const std::string& name, Fn fn, benchmark::TimeUnit unit) {
  auto guarded = [fn = std::move(fn)](benchmark::State& state) {
    try {
      fn(state);
    } catch (const std::exception& e) {
      state.SkipWithError(e.what());
    }
  };
  return benchmark::RegisterBenchmark(name.c_str(), std::move(guarded))->UseManualTime()->Unit(unit);
}

template <class T>
constexpr const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>)
    return "f32";
  else if constexpr (std::is_same_v<T, double>)
    return "f64";
  else if constexpr (std::is_same_v<T, qlora::bf16>)
    return "bf16";
  else
    return "f16";
}

// "/rows:512/cols:2048": the argument suffix shared by a kernel and its reference.
inline std::string args(std::initializer_list<std::pair<const char*, std::int64_t>> named) {
  std::string s;
  for (const auto& [name, value] : named) s.append("/").append(name).append(":").append(std::to_string(value));
  return s;
}

// ---- CPU: inputs and timing ---------------------------------------------------------------------------

// A zero-filled host array of n elements.
template <class T = float>
std::vector<T> zeros(std::int64_t n) {
  return std::vector<T>(static_cast<std::size_t>(n));
}

// Uniform random floats in [lo, hi): Philox stream `seed` (never zeros: a kernel fed zeros can skip work).
inline std::vector<float> uniform(std::int64_t n, std::uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::vector<float> y = zeros(n);
  qlora::cpu::fill_uniform(y.data(), n, seed, 0, lo, hi);
  return y;
}

// Cross-entropy targets in [0, vocab) from the Philox stream `seed`.
inline std::vector<std::int32_t> random_targets(std::int64_t rows, std::int64_t vocab, std::uint64_t seed) {
  std::vector<std::int32_t> t = zeros<std::int32_t>(rows);
  for (std::int64_t r = 0; r < rows; ++r)
    t[std::size_t(r)] = std::int32_t(
        std::min<std::int64_t>(vocab - 1, std::int64_t(qlora::philox_uniform(seed, std::uint64_t(r)) * float(vocab))));
  return t;
}

// Times op() once per iteration on the wall clock (the default timer counts only the main thread's CPU
// time, not the OpenMP workers'). One untimed call first: first touch of outputs, thread-pool start.
// Returns the seconds measured, the same total Google Benchmark divides by.
template <class Op>
double time_cpu(benchmark::State& state, Op&& op) {
  op();
  double total = 0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    op();
    benchmark::ClobberMemory();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    state.SetIterationTime(seconds);
    total += seconds;
  }
  return total;
}

// memcpy with every OpenMP thread copying its own slice: the bandwidth the CPU kernels can hope for.
inline void parallel_memcpy(void* dst, const void* src, std::int64_t bytes) {
  const int threads = omp_get_max_threads();
  const std::int64_t slice = (bytes + threads - 1) / threads;
#pragma omp parallel for
  for (int i = 0; i < threads; ++i) {
    const std::int64_t begin = std::min(bytes, i * slice), end = std::min(bytes, begin + slice);
    std::memcpy(static_cast<char*>(dst) + begin, static_cast<const char*>(src) + begin, std::size_t(end - begin));
  }
}

// BM_reference_memcpy<suffix>: copies `bytes` (traffic 2 * bytes: read + write). Registered now; returns
// the reference for the kernels registered after it.
inline ReferencePtr add_memcpy_reference(const std::string& suffix, std::int64_t bytes) {
  auto ref = make_reference("BM_reference_memcpy" + suffix, Work::bytes);
  add(
      ref->name,
      [ref, bytes](benchmark::State& state) {
        const std::int64_t n = bytes / std::int64_t(sizeof(float));
        const std::vector<float> src = uniform(n, 1);
        std::vector<float> dst = zeros(n);
        const double seconds = time_cpu(state, [&] { parallel_memcpy(dst.data(), src.data(), bytes); });
        report_reference(state, *ref, 2.0 * double(bytes), seconds);
      },
      benchmark::kMillisecond);
  return ref;
}

// Row-major C (m, n) = op(A) op(B) through Eigen's GEMM, batch items in parallel (each on one thread) when
// batch > 1, else Eigen's own parallel GEMM. The CPU compute reference.
template <class T>
void eigen_gemm(const T* a, const T* b, T* c, std::int64_t m, std::int64_t n, std::int64_t k, bool trans_a,
                bool trans_b, std::int64_t batch, std::int64_t stride_a, std::int64_t stride_b, std::int64_t stride_c) {
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
#pragma omp parallel for if (batch > 1)
  for (std::int64_t i = 0; i < batch; ++i) {
    const Eigen::Map<const Matrix> A(a + i * stride_a, trans_a ? k : m, trans_a ? m : k);
    const Eigen::Map<const Matrix> B(b + i * stride_b, trans_b ? n : k, trans_b ? k : n);
    Eigen::Map<Matrix> C(c + i * stride_c, m, n);
    if (!trans_a && !trans_b) C.noalias() = A * B;
    if (!trans_a && trans_b) C.noalias() = A * B.transpose();
    if (trans_a && !trans_b) C.noalias() = A.transpose() * B;
    if (trans_a && trans_b) C.noalias() = A.transpose() * B.transpose();
  }
}

// ---- CUDA: buffers, inputs, timing, cuBLAS ---------------------------------------------------------------

#if defined(QLORA_WITH_CUDA)

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw qlora::Error(std::string(what) + ": " + cudaGetErrorString(status));
}
inline void check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw qlora::Error(std::string(what) + ": cuBLAS status " + std::to_string(int(status)));
}

// The one stream every benchmark of the program runs on.
inline cudaStream_t stream() {
  static cudaStream_t s = [] {
    cudaStream_t created = nullptr;
    check(cudaStreamCreateWithFlags(&created, cudaStreamNonBlocking), "cudaStreamCreate");
    return created;
  }();
  return s;
}

// Device memory owned by a benchmark run (plain cudaMalloc: the caching allocator is not under test).
template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::int64_t n) : n_(n) {
    check(cudaMalloc(reinterpret_cast<void**>(&p_), std::size_t(n) * sizeof(T)), "cudaMalloc");
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(p_); }
  T* get() const { return p_; }
  std::int64_t size() const { return n_; }
  std::int64_t bytes() const { return n_ * std::int64_t(sizeof(T)); }

 private:
  T* p_ = nullptr;
  std::int64_t n_ = 0;
};

// Fills device memory with uniform random values in [lo, hi) (Philox on the device, then rounded to T).
template <class T>
void fill_uniform(T* y, std::int64_t n, std::uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  if constexpr (std::is_same_v<T, float>) {
    qlora::cuda::fill_uniform(y, n, seed, 0, lo, hi, stream());
  } else {
    const std::int64_t chunk = std::min<std::int64_t>(n, std::int64_t(1) << 24);
    DeviceBuffer<float> tmp(chunk);
    for (std::int64_t i = 0; i < n; i += chunk) {
      const std::int64_t len = std::min(chunk, n - i);
      qlora::cuda::fill_uniform(tmp.get(), len, seed, std::uint64_t(i), lo, hi, stream());
      qlora::cuda::convert<float, T>(tmp.get(), y + i, len, stream());
    }
  }
  check(cudaStreamSynchronize(stream()), "fill_uniform");
}
template <class T>
void fill_uniform(DeviceBuffer<T>& y, std::uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  fill_uniform(y.get(), y.size(), seed, lo, hi);
}

template <class T>
void upload(DeviceBuffer<T>& y, const std::vector<T>& x) {
  // On stream(), then waited for: a plain cudaMemcpy from pageable memory may return before the data lands,
  // and stream() (non-blocking) would not wait for the legacy default stream.
  check(cudaMemcpyAsync(y.get(), x.data(), x.size() * sizeof(T), cudaMemcpyHostToDevice, stream()), "upload");
  check(cudaStreamSynchronize(stream()), "upload");
}

class Event {
 public:
  Event() { check(cudaEventCreate(&e_), "cudaEventCreate"); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event() { cudaEventDestroy(e_); }
  cudaEvent_t get() const { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

// Times op() (which enqueues work on stream()) once per iteration between two CUDA events, after
// `warmup` untimed calls (lazy handles and workspaces, clocks ramping up). Returns the seconds measured.
template <class Op>
double time_cuda(benchmark::State& state, Op&& op, int warmup = 3) {
  for (int i = 0; i < warmup; ++i) op();
  check(cudaStreamSynchronize(stream()), "warm-up");
  Event start, stop;
  double total = 0;
  for (auto _ : state) {
    check(cudaEventRecord(start.get(), stream()), "cudaEventRecord");
    op();
    check(cudaEventRecord(stop.get(), stream()), "cudaEventRecord");
    check(cudaEventSynchronize(stop.get()), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, start.get(), stop.get()), "cudaEventElapsedTime");
    state.SetIterationTime(double(ms) * 1e-3);
    total += double(ms) * 1e-3;
  }
  return total;
}

// BM_reference_d2d_copy<suffix>: a device-to-device cudaMemcpy of `bytes` (traffic 2 * bytes), the
// measured HBM bandwidth. Pick bytes well above the L2 size (50 MiB on H100) so the copy is not cached.
inline ReferencePtr add_d2d_copy_reference(const std::string& suffix, std::int64_t bytes) {
  auto ref = make_reference("BM_reference_d2d_copy" + suffix, Work::bytes);
  add(
      ref->name,
      [ref, bytes](benchmark::State& state) {
        DeviceBuffer<float> src(bytes / std::int64_t(sizeof(float))), dst(bytes / std::int64_t(sizeof(float)));
        fill_uniform(src, 1);
        const double seconds = time_cuda(state, [&] {
          check(cudaMemcpyAsync(dst.get(), src.get(), std::size_t(src.bytes()), cudaMemcpyDeviceToDevice, stream()),
                "cudaMemcpyAsync");
        });
        report_reference(state, *ref, 2.0 * double(src.bytes()), seconds);
      },
      benchmark::kMicrosecond);
  return ref;
}

template <class T>
constexpr cudaDataType_t cuda_data_type() {
  if constexpr (std::is_same_v<T, float>)
    return CUDA_R_32F;
  else
    return CUDA_R_16BF;
}

inline cublasHandle_t cublas() {
  static cublasHandle_t handle = [] {
    cublasHandle_t created = nullptr;
    check(cublasCreate(&created), "cublasCreate");
    check(cublasSetStream(created, stream()), "cublasSetStream");
    return created;
  }();
  return handle;
}

// Row-major batched C (m, n) = op(A) op(B) through cublasGemmEx (cublasGemmStridedBatchedEx when batch > 1)
// with f32 accumulation (CUBLAS_COMPUTE_32F: bf16 inputs on tensor cores, f32 inputs in full f32, no TF32).
// Row-major is the column-major product C^T = op(B)^T op(A)^T. The GPU compute reference.
template <class T>
void cublas_gemm(const T* a, const T* b, T* c, std::int64_t m, std::int64_t n, std::int64_t k, bool trans_a,
                 bool trans_b, std::int64_t batch, std::int64_t stride_a, std::int64_t stride_b,
                 std::int64_t stride_c) {
  const float alpha = 1.0f, beta = 0.0f;
  const cudaDataType_t type = cuda_data_type<T>();
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  if (batch == 1) {
    check(cublasGemmEx(cublas(), op_b, op_a, int(n), int(m), int(k), &alpha, b, type, int(trans_b ? k : n), a, type,
                       int(trans_a ? m : k), &beta, c, type, int(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "cublasGemmEx");
    return;
  }
  check(cublasGemmStridedBatchedEx(cublas(), op_b, op_a, int(n), int(m), int(k), &alpha, b, type, int(trans_b ? k : n),
                                   stride_b, a, type, int(trans_a ? m : k), stride_a, &beta, c, type, int(n), stride_c,
                                   int(batch), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "cublasGemmStridedBatchedEx");
}

inline std::string cuda_device_name() {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) return "unknown";
  return prop.name;
}

#endif  // QLORA_WITH_CUDA

// ---- main ---------------------------------------------------------------------------------------------------

inline std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      return colon == std::string::npos ? line : line.substr(line.find_first_not_of(' ', colon + 1));
    }
  }
  return "unknown";
}

// The main of every bench program: registers the CPU benchmarks, and the CUDA ones when this build has the
// CUDA backend and a device answers (otherwise one line on stderr says why they are absent), records the
// CPU model and CUDA device in the output's context, and runs what --benchmark_filter selects.
inline int bench_main(int argc, char** argv, void (*register_cpu)(), void (*register_cuda)()) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  const char* program = argc > 0 ? argv[0] : "bench";
  if (const char* slash = std::strrchr(program, '/')) program = slash + 1;
  benchmark::AddCustomContext("cpu_model", cpu_model());
  benchmark::AddCustomContext("omp_threads", std::to_string(omp_get_max_threads()));
  register_cpu();
#if defined(QLORA_WITH_CUDA)
  if (qlora::cuda::device_count() > 0) {
    benchmark::AddCustomContext("cuda_device", cuda_device_name());
    register_cuda();
  } else {
    std::fprintf(stderr, "%s: CUDA benchmarks not registered: no usable CUDA device (%s)\n", program,
                 qlora::cuda::unavailable_reason());
  }
#else
  (void)register_cuda;
  std::fprintf(stderr, "%s: CUDA benchmarks not built (this build has no CUDA backend: -DQLORA_CUDA=ON)\n", program);
#endif
  try {
    benchmark::RunSpecifiedBenchmarks();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", program, e.what());
    return 1;
  }
  benchmark::Shutdown();
  return 0;
}

}  // namespace qlora::bench
