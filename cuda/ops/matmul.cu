// Row-major (batched) matrix multiply C = alpha op(A) op(B) + beta C through cuBLASLt.
// cuBLASLt is column-major; a row-major (R, C) buffer is the column-major (C, R) matrix with ld = C, i.e. its
// transpose. So the row-major C = op(A) op(B) is computed as the column-major C^T = op(B)^T op(A)^T: cuBLASLt's
// first operand is our B (transposed iff trans_b), its second our A (transposed iff trans_a), and no data moves.
// Batches use cuBLASLt's strided batch (stride 0 broadcasts A or B). Compute is CUBLAS_COMPUTE_32F with an f32
// scale type: f32 accumulation, and f32 inputs are multiplied in full f32 (never TF32).
// One handle and one 32 MiB workspace per device, created on first use under a mutex and kept for the life of
// the process (no teardown at exit, when the CUDA runtime may already be gone). The heuristic is told each
// pointer's real alignment, so views at any element offset are safe.
// f32 inputs with a bf16 output (which cuBLASLt does not offer with f32 compute) go through an f32 temporary
// from the caching allocator, rounded into C once.
// Not done yet: caching descriptors and the chosen algorithm per shape, epilogues (bias, activation), a
// per-stream workspace for concurrent streams.

#include <cublasLt.h>

#include <mutex>
#include <type_traits>
#include <unordered_map>

#include "common.cuh"
#include "qlora/cuda/matmul.hpp"
#include "qlora/cuda/runtime.hpp"

namespace qlora::cuda {
namespace {

using namespace detail;

[[noreturn]] void throw_cublas_error(cublasStatus_t status, const char* expr, const char* file, int line) {
  throw ::qlora::Error(std::string("cuBLASLt error at ") + file + ":" + std::to_string(line) + ": " + expr + ": " +
                       cublasLtGetStatusName(status) + " (" + cublasLtGetStatusString(status) + ")");
}

#define QLORA_CUBLAS_CHECK(expr)                                               \
  do {                                                                         \
    const cublasStatus_t qlora_status_ = (expr);                               \
    if (qlora_status_ != CUBLAS_STATUS_SUCCESS)                                \
      throw_cublas_error(qlora_status_, #expr, __FILE__, __LINE__);            \
  } while (0)

// ---- per-device handle and workspace ---------------------------------------------------------------------

constexpr std::size_t kWorkspaceBytes = std::size_t(32) << 20;

struct DeviceContext {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
};

const DeviceContext& device_context() {
  static std::mutex mutex;
  static auto& contexts = *new std::unordered_map<int, DeviceContext>;  // never destroyed: see the top
  int device = 0;
  QLORA_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard lock(mutex);
  if (const auto found = contexts.find(device); found != contexts.end()) return found->second;
  DeviceContext context;
  QLORA_CUBLAS_CHECK(cublasLtCreate(&context.handle));
  if (const cudaError_t status = cudaMalloc(&context.workspace, kWorkspaceBytes); status != cudaSuccess) {
    cublasLtDestroy(context.handle);
    throw_cuda_error(status, "cudaMalloc(cuBLASLt workspace)", __FILE__, __LINE__);
  }
  return contexts.emplace(device, context).first->second;
}

// ---- descriptors, owned --------------------------------------------------------------------------------

template <class Handle, cublasStatus_t (*destroy)(Handle)>
struct Owned {
  Handle handle = nullptr;
  Owned() = default;
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
  ~Owned() {
    if (handle != nullptr) destroy(handle);
  }
};
using MatmulDesc = Owned<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy>;
using MatrixLayout = Owned<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy>;
using MatmulPreference = Owned<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy>;

template <class T>
constexpr cudaDataType_t data_type() {
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, qlora::bf16>) return CUDA_R_16BF;
  else static_assert(sizeof(T) == 0, "matmul: unsupported element type");
}

// Describes a row-major (rows, cols) matrix, batched with `stride` elements between matrices, as cuBLASLt's
// column-major (cols, rows) matrix with leading dimension cols.
void describe_row_major(MatrixLayout& layout, cudaDataType_t type, std::int64_t rows, std::int64_t cols,
                        std::int64_t batch, std::int64_t stride) {
  QLORA_CUBLAS_CHECK(
      cublasLtMatrixLayoutCreate(&layout.handle, type, std::uint64_t(cols), std::uint64_t(rows), cols));
  if (batch > 1) {
    const auto count = std::int32_t(batch);
    QLORA_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout.handle, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count,
                                                        sizeof(count)));
    QLORA_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout.handle, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                        &stride, sizeof(stride)));
  }
}

// The largest power of two (at most 256) dividing the address of every matrix of the batch.
std::uint32_t alignment_bytes(const void* p, std::int64_t stride, std::size_t element_bytes, std::int64_t batch) {
  std::uintptr_t bits = reinterpret_cast<std::uintptr_t>(p);
  if (batch > 1) bits |= std::uintptr_t(stride) * element_bytes;
  std::uint32_t alignment = 256;
  while (alignment > 1 && bits % alignment != 0) alignment /= 2;
  return alignment;
}

void set_min_alignment(MatmulPreference& preference, cublasLtMatmulPreferenceAttributes_t attribute,
                       std::uint32_t bytes) {
  QLORA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference.handle, attribute, &bytes, sizeof(bytes)));
}

// k == 0: op(A) op(B) is the zero matrix, so C = beta C (and beta == 0 writes zeros without reading C).
template <class TC>
__global__ void scale_matrices_kernel(TC* c, std::int64_t matrix_elements, std::int64_t batch, std::int64_t stride,
                                      float beta) {
  for (std::int64_t i = grid_index(); i < matrix_elements * batch; i += grid_stride()) {
    TC* ci = c + (i / matrix_elements) * stride + i % matrix_elements;
    *ci = from_f32<TC>(beta == 0.0f ? 0.0f : beta * to_f32(*ci));
  }
}

// dst matrix i = src matrix i, converted; matrices of `matrix_elements` elements at the given strides.
template <class Src, class Dst>
__global__ void convert_matrices_kernel(const Src* src, std::int64_t src_stride, Dst* dst, std::int64_t dst_stride,
                                        std::int64_t matrix_elements, std::int64_t batch) {
  for (std::int64_t i = grid_index(); i < matrix_elements * batch; i += grid_stride()) {
    const std::int64_t matrix = i / matrix_elements, element = i % matrix_elements;
    dst[matrix * dst_stride + element] = from_f32<Dst>(to_f32(src[matrix * src_stride + element]));
  }
}

template <class Src, class Dst>
void convert_matrices(const Src* src, std::int64_t src_stride, Dst* dst, std::int64_t dst_stride,
                      std::int64_t matrix_elements, std::int64_t batch, Stream stream) {
  convert_matrices_kernel<<<elementwise_grid(matrix_elements * batch), kElementwiseThreads, 0, stream>>>(
      dev(src), src_stride, dev(dst), dst_stride, matrix_elements, batch);
  check_launch("convert_matrices_kernel");
}

// Device scratch memory from the caching allocator, ordered on `stream` and returned to it on scope exit.
class Scratch {
 public:
  Scratch(std::size_t bytes, Stream stream) : device_(current_device()), data_(allocate(bytes, device_, stream)) {}
  ~Scratch() { deallocate(data_, device_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  int device_;
  void* data_;
};

// C = alpha op(A) op(B) + beta C by one cuBLASLt call (m, n, k > 0; a type combination cuBLASLt has).
template <class TA, class TB, class TC>
void cublaslt_matmul(const TA* a, const TB* b, TC* c, std::int64_t m, std::int64_t n, std::int64_t k, bool trans_a,
                     bool trans_b, float alpha, float beta, std::int64_t batch, std::int64_t stride_a,
                     std::int64_t stride_b, std::int64_t stride_c, Stream stream) {
  QLORA_CHECK(batch <= 0x7fffffff, "matmul: batch " + std::to_string(batch) + " does not fit cuBLASLt's int32");
  const DeviceContext& context = device_context();

  // Column-major C^T (n, m) = op(B)^T (n, k) op(A)^T (k, m).
  MatmulDesc desc;
  QLORA_CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc.handle, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_first = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;   // applied to our B
  const cublasOperation_t op_second = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;  // applied to our A
  QLORA_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(desc.handle, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first)));
  QLORA_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(desc.handle, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof(op_second)));

  MatrixLayout layout_b, layout_a, layout_c;
  describe_row_major(layout_b, data_type<TB>(), trans_b ? n : k, trans_b ? k : n, batch, stride_b);
  describe_row_major(layout_a, data_type<TA>(), trans_a ? k : m, trans_a ? m : k, batch, stride_a);
  describe_row_major(layout_c, data_type<TC>(), m, n, batch, stride_c);

  MatmulPreference preference;
  QLORA_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference.handle));
  const std::uint64_t workspace_bytes = kWorkspaceBytes;
  QLORA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference.handle, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                          &workspace_bytes, sizeof(workspace_bytes)));
  const std::uint32_t align_first = alignment_bytes(b, stride_b, sizeof(TB), batch);
  const std::uint32_t align_second = alignment_bytes(a, stride_a, sizeof(TA), batch);
  const std::uint32_t align_c = alignment_bytes(c, stride_c, sizeof(TC), batch);
  set_min_alignment(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_first);
  set_min_alignment(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_second);
  set_min_alignment(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c);
  set_min_alignment(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c);

  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  QLORA_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(context.handle, desc.handle, layout_b.handle, layout_a.handle,
                                                    layout_c.handle, layout_c.handle, preference.handle, 1,
                                                    &heuristic, &found));
  QLORA_CHECK(found > 0, "matmul: cuBLASLt has no algorithm for m " + std::to_string(m) + ", n " + std::to_string(n) +
                             ", k " + std::to_string(k) + ", batch " + std::to_string(batch) +
                             (trans_a ? ", trans_a" : "") + (trans_b ? ", trans_b" : ""));

  QLORA_CUBLAS_CHECK(cublasLtMatmul(context.handle, desc.handle, &alpha, b, layout_b.handle, a, layout_a.handle, &beta,
                                    c, layout_c.handle, c, layout_c.handle, &heuristic.algo, context.workspace,
                                    kWorkspaceBytes, stream));
}

}  // namespace

template <class TA, class TB, class TC>
void matmul(const TA* a, const TB* b, TC* c, std::int64_t m, std::int64_t n, std::int64_t k, bool trans_a,
            bool trans_b, float alpha, float beta, std::int64_t batch, std::int64_t stride_a, std::int64_t stride_b,
            std::int64_t stride_c, Stream stream) {
  if (m <= 0 || n <= 0 || batch <= 0) return;
  if (k <= 0) {
    const std::int64_t total = m * n * batch;
    scale_matrices_kernel<<<elementwise_grid(total), kElementwiseThreads, 0, stream>>>(dev(c), m * n, batch,
                                                                                        stride_c, beta);
    check_launch("scale_matrices_kernel");
    return;
  }
  if constexpr (std::is_same_v<TA, float> && std::is_same_v<TC, qlora::bf16>) {
    // f32 x f32 -> bf16: the f32 product (plus beta C, widened) in a contiguous temporary, then rounded into C.
    const std::int64_t elements = m * n;
    const Scratch product(std::size_t(elements * batch) * sizeof(float), stream);
    if (beta != 0.0f) convert_matrices(c, stride_c, product.as<float>(), elements, elements, batch, stream);
    cublaslt_matmul(a, b, product.as<float>(), m, n, k, trans_a, trans_b, alpha, beta, batch, stride_a, stride_b,
                    elements, stream);
    convert_matrices(product.as<const float>(), elements, c, stride_c, elements, batch, stream);
  } else {
    cublaslt_matmul(a, b, c, m, n, k, trans_a, trans_b, alpha, beta, batch, stride_a, stride_b, stride_c, stream);
  }
}

#define QLORA_INSTANTIATE(TA, TB, TC)                                                                            \
  template void matmul<TA, TB, TC>(const TA*, const TB*, TC*, std::int64_t, std::int64_t, std::int64_t, bool,    \
                                   bool, float, float, std::int64_t, std::int64_t, std::int64_t, std::int64_t,  \
                                   Stream);
QLORA_INSTANTIATE(float, float, float)
QLORA_INSTANTIATE(float, float, qlora::bf16)
QLORA_INSTANTIATE(qlora::bf16, qlora::bf16, qlora::bf16)
QLORA_INSTANTIATE(qlora::bf16, qlora::bf16, float)

}  // namespace qlora::cuda
