#pragma once
// The tape: an ordered list of explicit backward steps. Modules compute their own forward and, for each
// forward, push one step that maps the gradient of that forward's output to the gradient of its input
// (accumulating parameter gradients on the way). What a step captures is exactly what it saved; dropping
// the tape frees it. Nothing is traced: the tape only sequences steps and runs them in reverse.
//
// Models in this project are chains (embedding -> blocks -> norm -> head), so a step takes one gradient
// and returns one; a branch inside a module (a residual) is expressed with a nested tape:
//   Tape inner; Tensor h = f(inner, x);
//   tape.push("residual", [inner = std::move(inner)](const Tensor& dy) mutable { return add(dy, inner.backward(dy)); });

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "qlora/core/tensor.hpp"

namespace qlora::autograd {

class Tape {
 public:
  using Step = std::function<Tensor(const Tensor& dy)>;

  void push(std::string name, Step step) { steps_.push_back({std::move(name), std::move(step)}); }

  // Runs the steps from last to first, each on the gradient the next one returned; returns the gradient
  // with respect to the first recorded input. The tape is empty afterwards (its saved tensors are freed).
  Tensor backward(Tensor dy) {
    while (!steps_.empty()) {
      Entry entry = std::move(steps_.back());
      steps_.pop_back();
      dy = entry.step(dy);
    }
    return dy;
  }

  std::size_t size() const { return steps_.size(); }
  bool empty() const { return steps_.empty(); }
  void clear() { steps_.clear(); }
  // Names of the recorded steps, first to last (for diagnostics and tests).
  std::vector<std::string> names() const {
    std::vector<std::string> n;
    for (const Entry& e : steps_) n.push_back(e.name);
    return n;
  }

 private:
  struct Entry {
    std::string name;
    Step step;
  };
  std::vector<Entry> steps_;
};

}  // namespace qlora::autograd
