// Run reporting: the progress line's fields, ETA formatting, the JSONL log, and the SVG loss curve.

#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>

#include "qlora/train/metrics.hpp"

using namespace qlora::train;

TEST_CASE("metrics: the progress line shows step, loss, lr, throughput, ETA and peak memory") {
  StepMetrics m;
  m.step = 10;
  m.total_steps = 100;
  m.loss = 1.23456;
  m.lr = 2e-4;
  m.grad_norm = 0.5;
  m.tokens_per_second = 1234;
  m.elapsed_seconds = 20;  // 2 s a step, 90 steps to go: 3 minutes
  m.peak_memory_bytes = std::size_t(3) << 29;
  CHECK(progress_line(m) == "step 10/100  loss 1.2346  lr 2.00e-04  |g| 0.5  1234 tok/s  ETA 3m00s  peak 1.50 GiB");
  CHECK(format_duration(3725) == "1h02m");
  CHECK(format_duration(-1) == "?");
}

TEST_CASE("metrics: the JSONL log has one parseable object per line, and the SVG has both curves") {
  const auto path = std::filesystem::temp_directory_path() / ("qlora-metrics-" + std::to_string(::getpid()) + ".jsonl");
  {
    MetricsLog log(path);
    log.write({{"step", 1}, {"loss", 2.5}});
    log.write({{"step", 2}, {"loss", 2.25}});
  }
  std::ifstream in(path);
  std::string line;
  int lines = 0;
  while (std::getline(in, line)) CHECK(nlohmann::json::parse(line).at("step") == ++lines);
  CHECK(lines == 2);
  const std::string svg = loss_curve_svg({{1, 2.5}, {2, 2.25}, {3, NAN}}, {{2, 2.4}});
  CHECK(svg.rfind("<svg", 0) == 0);
  CHECK(svg.find("polyline") != std::string::npos);
  CHECK(svg.find("eval") != std::string::npos);
  CHECK(svg.find("nan") == std::string::npos);
  CHECK_THROWS_AS(MetricsLog("/nonexistent-dir/m.jsonl"), qlora::Error);
}
