#pragma once
// What a training run tells its user: a progress line per logged step (step, loss, lr, tokens/s, ETA, peak
// memory), a metrics JSONL file (one object per logged step or evaluation, appended and flushed so a crash
// loses nothing), and at the end a summary JSON and an SVG picture of the loss curve next to the metrics.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/core/error.hpp"
#include "qlora/io/atomic_write.hpp"

namespace qlora::train {

struct StepMetrics {
  std::int64_t step = 0, total_steps = 0;
  double loss = 0, lr = 0, grad_norm = 0;
  double tokens_per_second = 0, elapsed_seconds = 0;
  std::size_t peak_memory_bytes = 0;
};

inline std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto s = static_cast<long long>(seconds + 0.5);
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%lldh%02lldm", s / 3600, (s / 60) % 60);
  else if (s >= 60) std::snprintf(buf, sizeof buf, "%lldm%02llds", s / 60, s % 60);
  else std::snprintf(buf, sizeof buf, "%llds", s);
  return buf;
}

// "step 120/1000  loss 1.2345  lr 2.00e-04  |g| 0.41  1234 tok/s  ETA 12m03s  peak 1.2 GiB"
inline std::string progress_line(const StepMetrics& m) {
  const double eta = m.step > 0 ? m.elapsed_seconds / double(m.step) * double(m.total_steps - m.step) : NAN;
  char buf[256];
  std::snprintf(buf, sizeof buf, "step %lld/%lld  loss %.4f  lr %.2e  |g| %.3g  %.0f tok/s  ETA %s  peak %.2f GiB",
                static_cast<long long>(m.step), static_cast<long long>(m.total_steps), m.loss, m.lr, m.grad_norm,
                m.tokens_per_second, format_duration(eta).c_str(), double(m.peak_memory_bytes) / double(1ull << 30));
  return buf;
}

// Appends one JSON object per line and flushes it.
class MetricsLog {
 public:
  explicit MetricsLog(const std::filesystem::path& path, bool append = false)
      : path_(path), out_(path, append ? std::ios::app : std::ios::trunc) {
    if (!out_) throw Error(path.string() + ": cannot open the metrics file for writing");
  }
  void write(const nlohmann::json& record) {
    out_ << record.dump() << '\n';
    out_.flush();
    if (!out_) throw Error(path_.string() + ": writing the metrics failed (disk full?)");
  }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  std::ofstream out_;
};

// An SVG line chart of (step, value) series: the training loss and, when given, the evaluation loss.
inline std::string loss_curve_svg(const std::vector<std::pair<double, double>>& train,
                                  const std::vector<std::pair<double, double>>& eval = {},
                                  const std::string& title = "loss") {
  constexpr double W = 640, H = 400, L = 60, R = 20, T = 30, B = 45;
  double x_max = 1, y_min = INFINITY, y_max = -INFINITY;
  for (const auto* series : {&train, &eval})
    for (const auto& [x, y] : *series) {
      if (!std::isfinite(y)) continue;
      x_max = std::max(x_max, x);
      y_min = std::min(y_min, y);
      y_max = std::max(y_max, y);
    }
  if (!std::isfinite(y_min)) y_min = 0, y_max = 1;
  if (y_max - y_min < 1e-9) y_min -= 0.5, y_max += 0.5;
  const auto px = [&](double x) { return L + (W - L - R) * x / x_max; };
  const auto py = [&](double y) { return H - B - (H - T - B) * (y - y_min) / (y_max - y_min); };
  char buf[256];
  std::string svg = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"640\" height=\"400\" font-family=\"sans-serif\" "
                    "font-size=\"12\">\n<rect width=\"640\" height=\"400\" fill=\"white\"/>\n";
  std::snprintf(buf, sizeof buf, "<text x=\"%g\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">%s</text>\n", W / 2,
                title.c_str());
  svg += buf;
  std::snprintf(buf, sizeof buf,
                "<line x1=\"%g\" y1=\"%g\" x2=\"%g\" y2=\"%g\" stroke=\"black\"/>\n"
                "<line x1=\"%g\" y1=\"%g\" x2=\"%g\" y2=\"%g\" stroke=\"black\"/>\n",
                L, H - B, W - R, H - B, L, T, L, H - B);
  svg += buf;
  for (int i = 0; i <= 4; ++i) {  // y ticks
    const double y = y_min + (y_max - y_min) * i / 4;
    std::snprintf(buf, sizeof buf, "<text x=\"%g\" y=\"%g\" text-anchor=\"end\">%.3g</text>\n", L - 5, py(y) + 4, y);
    svg += buf;
  }
  std::snprintf(buf, sizeof buf,
                "<text x=\"%g\" y=\"%g\" text-anchor=\"middle\">step</text>\n"
                "<text x=\"%g\" y=\"%g\" text-anchor=\"end\">%.0f</text>\n",
                (L + W - R) / 2, H - 10, W - R, H - B + 15, x_max);
  svg += buf;
  const auto polyline = [&](const std::vector<std::pair<double, double>>& series, const char* color) {
    std::string points;
    for (const auto& [x, y] : series)
      if (std::isfinite(y)) {
        std::snprintf(buf, sizeof buf, "%.1f,%.1f ", px(x), py(y));
        points += buf;
      }
    if (!points.empty())
      svg += "<polyline fill=\"none\" stroke=\"" + std::string(color) + "\" stroke-width=\"1.5\" points=\"" + points +
             "\"/>\n";
  };
  polyline(train, "#1f77b4");
  polyline(eval, "#d62728");
  svg += "<text x=\"" + std::to_string(int(W - R - 5)) +
         "\" y=\"45\" text-anchor=\"end\" fill=\"#1f77b4\">train</text>\n";
  if (!eval.empty())
    svg += "<text x=\"" + std::to_string(int(W - R - 5)) + "\" y=\"60\" text-anchor=\"end\" fill=\"#d62728\">eval</text>\n";
  return svg + "</svg>\n";
}

}  // namespace qlora::train
