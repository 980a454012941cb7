// libFuzzer target: our own training checkpoints (train/checkpoint.hpp), as `qlora train --resume` reads them:
// a valid checkpoint of two parameters is written once; each input replaces one of its three files (the
// first byte picks state.json, adapter.safetensors or optimizer.safetensors) before the checkpoint is found
// (complete_checkpoints) and loaded into fresh parameters and a fresh AdamW.
#include "fuzz_support.hpp"
#include "qlora/train/adamw.hpp"
#include "qlora/train/checkpoint.hpp"

namespace {

using namespace qlora;

struct Run {
  autograd::Param a{"layers.0.lora_A", Tensor::zeros({2, 3})}, b{"layers.0.lora_B", Tensor::zeros({3})};
  std::vector<autograd::Param*> params{&a, &b};
  train::AdamW optimizer{params};
};

struct ValidCheckpoint {
  std::filesystem::path out = fuzz::scratch_dir() / "run";
  std::filesystem::path dir;
  std::string files[3];
  static constexpr const char* kNames[3] = {"state.json", "adapter.safetensors", "optimizer.safetensors"};

  ValidCheckpoint() {
    Run run;
    run.a.value.data<float>()[4] = 1.5f;
    train::TrainerState state;
    state.step = 3;
    state.data = {1, 7};
    state.run = {{"lr", 0.001}, {"rank", 4}};
    train::save_checkpoint(out, run.params, run.optimizer, state);
    dir = train::checkpoint_dir(out, 3);
    for (int i = 0; i < 3; ++i) {
      std::ifstream in(dir / kNames[i], std::ios::binary);
      files[i].assign(std::istreambuf_iterator<char>(in), {});
    }
  }
  void write(int which, std::string_view bytes) const {
    std::ofstream(dir / kNames[which], std::ios::binary | std::ios::trunc).write(bytes.data(), std::streamsize(bytes.size()));
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const ValidCheckpoint valid;
  if (size == 0) return 0;
  const int which = data[0] % 3;
  for (int i = 0; i < 3; ++i) valid.write(i, i == which ? fuzz::as_text(data + 1, size - 1) : std::string_view(valid.files[i]));
  return fuzz::run_reader([&] {
    const auto latest = train::latest_checkpoint(valid.out);
    if (!latest) return;
    Run run;
    (void)train::load_checkpoint(*latest, run.params, run.optimizer);
  });
}
