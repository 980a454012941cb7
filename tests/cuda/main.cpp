// The main of the CUDA test suite: without a usable device (none, or no working driver, where
// cudaGetDeviceCount fails with "CUDA driver version is insufficient") it exits 77, which CTest's
// SKIP_RETURN_CODE reports as skipped rather than passed.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <cstdio>
#include <string_view>

int main(int argc, char** argv) {
  // Listing the test cases (CTest's discovery at build time) needs no device.
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg.starts_with("--list-test-cases") || arg.starts_with("-ltc")) return doctest::Context(argc, argv).run();
  }
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    std::printf("no CUDA device: skipping (%s)\n", status != cudaSuccess ? cudaGetErrorString(status) : "0 devices");
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
