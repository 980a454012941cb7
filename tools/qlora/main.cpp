// The qlora command-line tool: one binary, one subcommand per job (DESIGN.md, "Command-line contract").
// Subcommands appear here as their layers land; `qlora devices` reports the backends this build can use.

#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <omp.h>

#include <cstdio>
#include <exception>

#include "commands.hpp"
#include "qlora/core/error.hpp"
#if defined(QLORA_WITH_CUDA)
#include "qlora/cuda/runtime.hpp"
#endif

namespace {

void print_devices() {
  fmt::print("cpu: {} OpenMP threads\n", omp_get_max_threads());
#if defined(QLORA_WITH_CUDA)
  const int n = qlora::cuda::device_count();
  if (n == 0) fmt::print("cuda: built with CUDA, no usable device ({})\n", qlora::cuda::unavailable_reason());
  for (int i = 0; i < n; ++i) fmt::print("cuda:{}: available\n", i);
#else
  fmt::print("cuda: not built (configure with -DQLORA_CUDA=ON)\n");
#endif
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"qlora: quantize Llama-family models and fine-tune adapters on a frozen low-bit base"};
  app.set_version_flag("--version", qlora::tool::kToolVersion);
  app.require_subcommand(1);

  auto* devices = app.add_subcommand("devices", "List the compute backends this build can use");
  devices->callback(print_devices);
  qlora::tool::register_info(app);
  qlora::tool::register_generate(app);
  qlora::tool::register_train(app);
  qlora::tool::register_eval(app);
  qlora::tool::register_demo(app);
  qlora::tool::register_export(app);
  qlora::tool::register_quantize(app);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const qlora::Error& e) {
    std::fprintf(stderr, "qlora: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qlora: internal error: %s\n", e.what());
    return 2;
  }
  return 0;
}
