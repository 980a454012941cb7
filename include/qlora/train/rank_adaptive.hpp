#pragma once
// RA-LoRA during training (`qlora train --rank-adaptive`; docs/adapter-init.md, "RA-LoRA"): every `every` steps
// from `start` until `stop`, each low-rank adapter's update B A is analysed (nn/rank_adaptive.hpp: thin SVD,
// energy and subspace-stability criteria against the previous analysis), the ranks are reallocated under a
// parameter budget, and the layers are re-factored (shrunk to their top subspace or grown with zero columns of
// B). Reconstructed from methods/ra-lora.md (only the paper's abstract is verified; the rules are our design).
//
// * Budget: the trainable parameters sum_l r_l (d_in/p + d_out/k) never exceed it; by default it is the count
//   at the start (fixed rank r everywhere), so RA-LoRA moves rank between layers and may end with fewer.
// * Optimizer state of a resized parameter (AdamW): entries that keep their meaning keep their moments (the old
//   rows of A and columns of B when a layer grows); every other entry restarts with exp_avg = 0 and exp_avg_sq =
//   the mean of the tensor's old exp_avg_sq. The re-factored factors of a shrunk layer are new coordinates, so
//   nothing of the old moments projects onto them element-wise; and a zero exp_avg_sq with the run's bias
//   correction (1 - beta2^t ~ 1 late in training) would make the first update after the change
//   (1 - beta1) / sqrt(1 - beta2) ~ 3 times the learning rate per element.
// * Checkpoints: the per-layer ranks are the shapes of the saved factors; the previous analysis' left singular
//   vectors (the stability criterion's memory) travel as frozen tensors "rank_adaptive.<layer>.subspace". A
//   resumed run takes the same decisions as the uninterrupted one (bit for bit on the CPU).
// * The final adapter records the ranks as a rank_pattern (adapter_files.hpp); PEFT export writes PEFT's
//   rank_pattern / alpha_pattern from the layers (train/export.hpp).
// Supported: every LowRank preset (lora, qblora, qalora, qablora); hira (one full matrix) has no rank to adapt.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <iomanip>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/io/safetensors.hpp"
#include "qlora/nn/context.hpp"
#include "qlora/nn/quant_linear.hpp"
#include "qlora/nn/rank_adaptive.hpp"
#include "qlora/train/trainer.hpp"

namespace qlora::train {

struct RankAdaptiveOptions {
  std::int64_t budget = 0;  // trainable adapter parameters; 0: the count at the start
  std::int64_t start = 0;   // first analysis after this many steps (0: `every`)
  std::int64_t every = 200; // T_adj
  std::int64_t stop = 0;    // no analysis after this many steps (0: 30% of the run, then plain LoRA)
  // min_rank / max_rank 0: min(8, the smallest start rank) / twice the largest (the method's 8 and 128 for r = 64)
  nn::rank_adaptive::RankRule rule{.min_rank = 0, .max_rank = 0};
  std::uint64_t seed = 0;   // of the rows that growth adds

  nlohmann::json to_json() const {
    return {{"budget", budget},           {"start", start},         {"every", every},
            {"stop", stop},               {"energy", rule.energy},  {"stability", rule.stability},
            {"margin", rule.margin},      {"min_rank", rule.min_rank}, {"max_rank", rule.max_rank},
            {"multiple", rule.multiple}};
  }
};

// The adapters whose rank can change among `linears` (every LowRank one); a hira adapter is refused.
inline std::vector<nn::Linear*> rank_adaptive_layers(const std::vector<nn::Linear*>& linears) {
  std::vector<nn::Linear*> out;
  for (nn::Linear* l : linears) {
    const nn::AdapterShape shape = l->adapter_shape();
    if (shape.kind == nn::AdapterKind::none) continue;
    QLORA_CHECK(l->low_rank_adapter() != nullptr,
                "--rank-adaptive: " + l->name() + " carries a " + std::string(nn::adapter_kind_name(shape.kind)) +
                    " adapter (one full pooled matrix), which has no rank to adapt (use lora, qblora, qalora or qablora)");
    out.push_back(l);
  }
  QLORA_CHECK(!out.empty(), "--rank-adaptive: the model has no low-rank adapter");
  return out;
}

// Shapes the layers for an adapter saved with per-layer ranks (adapter_config.json's rank_pattern), before its
// values are loaded. Every name must be one of the layers.
inline void apply_rank_pattern(const std::vector<nn::Linear*>& linears, const std::map<std::string, std::int64_t>& pattern,
                               const std::string& where) {
  for (const auto& [name, rank] : pattern) {
    nn::LowRank* adapter = nullptr;
    for (nn::Linear* l : linears)
      if (l->name() == name) adapter = l->low_rank_adapter();
    QLORA_CHECK(adapter != nullptr, where + ": rank_pattern names " + name + ", which is not a low-rank adapter of the model");
    nn::rank_adaptive::reshape_for_loading(*adapter, rank);
  }
}

class RankAdaptiveLora final : public ParameterReshaper {
 public:
  // linears: the model's adapted linears (rank_adaptive_layers); total_steps: the run's --steps (for stop = 30%).
  RankAdaptiveLora(std::vector<nn::Linear*> linears, RankAdaptiveOptions options, std::int64_t total_steps)
      : options_(std::move(options)) {
    for (nn::Linear* l : rank_adaptive_layers(linears)) {
      Layer layer{l->name(), l->low_rank_adapter(), l->low_rank_adapter()->shape().rank, {}};
      const Tensor& b = layer.adapter->B.value;
      layer.subspace = autograd::Param("rank_adaptive." + layer.name + ".subspace",
                                       Tensor::zeros(Shape{b.dim(0), layer.adapter->shape().rank}, DType::f32), false);
      layers_.push_back(std::move(layer));
    }
    std::int64_t smallest = layers_.front().adapter->shape().rank, largest = smallest;
    for (const Layer& l : layers_) {
      smallest = std::min(smallest, l.adapter->shape().rank);
      largest = std::max(largest, l.adapter->shape().rank);
    }
    auto& rule = options_.rule;
    if (rule.min_rank == 0) rule.min_rank = std::min<std::int64_t>(8, smallest);
    if (rule.max_rank == 0) rule.max_rank = 2 * largest;
    rule.validate();
    QLORA_CHECK(rule.min_rank <= smallest && largest <= rule.max_rank,
                "--rank-adaptive: the adapters start at ranks " + std::to_string(smallest) + ".." + std::to_string(largest) +
                    ", outside [--rank-min " + std::to_string(rule.min_rank) + ", --rank-max " +
                    std::to_string(rule.max_rank) + "]");
    QLORA_CHECK(options_.every >= 1, "--rank-every must be >= 1, got " + std::to_string(options_.every));
    QLORA_CHECK(options_.start >= 0 && options_.stop >= 0 && options_.budget >= 0,
                "--rank-warmup, --rank-stop and --rank-budget must not be negative");
    if (options_.start == 0) options_.start = options_.every;
    if (options_.stop == 0) options_.stop = std::max<std::int64_t>(1, std::int64_t(std::ceil(0.3 * double(total_steps))));
    const std::int64_t initial = parameter_count();
    if (options_.budget == 0) options_.budget = initial;
    QLORA_CHECK(initial <= options_.budget, "--rank-budget " + std::to_string(options_.budget) +
                                                " is below the adapters' " + std::to_string(initial) +
                                                " parameters at the start (lower --rank or raise the budget)");
  }

  const RankAdaptiveOptions& options() const { return options_; }
  std::int64_t budget() const { return options_.budget; }

  std::int64_t parameter_count() const {
    std::int64_t n = 0;
    for (const Layer& l : layers_) n += l.adapter->A.value.numel() + l.adapter->B.value.numel();
    return n;
  }

  // Every layer's rank, by layer name.
  std::map<std::string, std::int64_t> ranks() const {
    std::map<std::string, std::int64_t> out;
    for (const Layer& l : layers_) out[l.name] = l.adapter->shape().rank;
    return out;
  }

  // The layers whose rank is no longer the one they were built with: adapter_config.json's rank_pattern.
  std::map<std::string, std::int64_t> rank_pattern() const {
    std::map<std::string, std::int64_t> out;
    for (const Layer& l : layers_)
      if (l.adapter->shape().rank != l.built_rank) out[l.name] = l.adapter->shape().rank;
    return out;
  }

  // Whether an analysis runs after `steps_done` steps.
  bool due(std::int64_t steps_done) const {
    return steps_done >= options_.start && steps_done <= options_.stop && (steps_done - options_.start) % options_.every == 0;
  }

  // Analyses every layer and reallocates the ranks now (the schedule aside). Returns what happened.
  Report adjust(std::int64_t steps_done) {
    namespace ra = nn::rank_adaptive;
    std::vector<ra::LayerAnalysis> analyses;
    for (const Layer& l : layers_) analyses.push_back(ra::analyse_layer(*l.adapter, nn::init::to_matrix(l.subspace.value, l.subspace.name), options_.rule));
    const std::vector<std::int64_t> k = ra::allocate_ranks(analyses, options_.budget, options_.rule);
    resized_.clear();
    double dropped = 0, total = 0;
    std::int64_t low = k.front(), high = k.front();
    nlohmann::json per_layer = nlohmann::json::object();
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      Layer& l = layers_[i];
      const ra::LayerAnalysis& a = analyses[i];
      dropped += a.energy_between(k[i], a.current);
      total += a.energy.sum();
      low = std::min(low, k[i]);
      high = std::max(high, k[i]);
      per_layer[l.name] = k[i];
      if (k[i] != a.current) {
        resized_[l.adapter->A.name] = {a.current, k[i]};
        resized_[l.adapter->B.name] = {a.current, k[i]};
        ra::set_rank(*l.adapter, k[i], a.svd, nn::mix_seed(options_.seed, std::uint64_t(steps_done), i));
      }
      l.subspace.value = nn::init::to_tensor(a.svd.u).to(DType::f32);  // the next analysis' U_prev
    }
    Report report;
    report.reshaped = !resized_.empty();
    const std::int64_t params = parameter_count();
    QLORA_CHECK(params <= options_.budget, "rank-adaptive: internal error, " + std::to_string(params) +
                                               " parameters exceed the budget of " + std::to_string(options_.budget));
    report.record = {{"step", steps_done},
                     {"rank_adjustment", {{"parameters", params}, {"budget", options_.budget},
                                          {"dropped_energy", dropped}, {"energy", total}, {"resized", resized_.size() / 2},
                                          {"ranks", per_layer}}}};
    std::ostringstream line;  // the header library links no fmt
    line << "step " << steps_done << ": ranks " << low << ".." << high << ", " << params << " of " << options_.budget
         << " parameters, " << resized_.size() / 2 << " layers resized, dropped energy " << std::setprecision(3) << dropped
         << " of " << total;
    report.line = line.str();
    return report;
  }

  Report after_step(std::int64_t steps_done) override {
    if (!due(steps_done)) return {};
    return adjust(steps_done);
  }

  std::vector<std::pair<std::string, Tensor>> remap_optimizer_state(
      const std::vector<std::pair<std::string, Tensor>>& before) override {
    std::vector<std::pair<std::string, Tensor>> after;
    for (const auto& [key, old] : before) {
      const std::size_t dot = key.rfind('.');
      const std::string param = key.substr(0, dot), state = key.substr(dot + 1);
      const auto it = resized_.find(param);
      if (it == resized_.end()) {
        after.emplace_back(key, old);
        continue;
      }
      QLORA_CHECK(state == "exp_avg" || state == "exp_avg_sq",
                  "--rank-adaptive: optimizer state '" + key + "' is not AdamW's (exp_avg, exp_avg_sq)");
      after.emplace_back(key, remapped(param, old, it->second, state == "exp_avg_sq"));
    }
    return after;
  }

  std::vector<Param*> checkpoint_state() override {
    std::vector<Param*> out;
    for (Layer& l : layers_) out.push_back(&l.subspace);
    return out;
  }

  void prepare_resume(const std::filesystem::path& dir) override {
    const io::SafetensorsFile file(dir / "adapter.safetensors");
    for (Layer& l : layers_) {
      for (const std::string* name : {&l.adapter->A.name, &l.subspace.name})
        QLORA_CHECK(file.contains(*name), (dir / "adapter.safetensors").string() + ": no tensor " + *name +
                                              " (a checkpoint of a run without --rank-adaptive?)");
      nn::rank_adaptive::reshape_for_loading(*l.adapter, file.load(l.adapter->A.name).dim(0));
      const Tensor subspace = file.load(l.subspace.name);
      QLORA_CHECK(subspace.rank() == 2 && subspace.dim(0) == l.adapter->B.value.dim(0),
                  (dir / "adapter.safetensors").string() + ": " + l.subspace.name + " has shape " + subspace.shape().str());
      l.subspace.value = Tensor::zeros(subspace.shape(), DType::f32);
    }
    resized_.clear();
  }

 private:
  struct Layer {
    std::string name;
    nn::LowRank* adapter;
    std::int64_t built_rank;   // what the adapter configuration gives the layer
    autograd::Param subspace;  // U of the last analysis (zeros before the first): the stability criterion's U_prev
  };
  struct Resize {
    std::int64_t from, to;
  };

  // The moment of a resized factor (see the top): a grown layer keeps its old rows of A / columns of B.
  Tensor remapped(const std::string& param, const Tensor& old, const Resize& r, bool second_moment) const {
    const Tensor host = old.to(Device::cpu()).to(DType::f64);
    double mean = 0;
    if (second_moment)
      for (std::int64_t i = 0; i < host.numel(); ++i) mean += host.data<double>()[i] / double(host.numel());
    const bool is_a = param.ends_with(".lora_A");  // A: rank x in (rows), B: out x rank (columns)
    const std::int64_t rows = is_a ? r.to : old.dim(0), cols = is_a ? old.dim(1) : r.to;
    Tensor fresh = Tensor::empty(Shape{rows, cols}, DType::f64);
    double* dst = fresh.data<double>();
    const double* src = host.data<double>();
    for (std::int64_t i = 0; i < rows; ++i)
      for (std::int64_t j = 0; j < cols; ++j) {
        const bool kept = r.to > r.from && (is_a ? i < r.from : j < r.from);
        dst[i * cols + j] = kept ? src[i * old.dim(1) + j] : second_moment ? mean : 0.0;
      }
    return fresh.to(old.dtype()).to(old.device());
  }

  RankAdaptiveOptions options_;
  std::vector<Layer> layers_;
  std::map<std::string, Resize> resized_;  // by parameter name, at the last adjustment
};

}  // namespace qlora::train
