#pragma once
// Activation checkpointing of one block: run its forward now on a scratch tape and drop that tape (and
// with it every activation the block saved), keeping only the block's input. In backward, run the
// forward again on a fresh tape and then that tape's backward. Memory: one input per block instead of
// all its activations; cost: one more forward.
//
// The forward must compute the same function when run again: a block that draws random numbers (dropout)
// takes its Philox (seed, offset) from its captured state, never from a counter that moves between calls.

#include <functional>
#include <string>
#include <utility>

#include "qlora/autograd/tape.hpp"

namespace qlora::autograd {

using BlockForward = std::function<Tensor(Tape&, const Tensor&)>;

inline Tensor checkpoint(Tape& tape, std::string name, BlockForward forward, const Tensor& x) {
  Tensor y;
  {
    Tape scratch;
    y = forward(scratch, x);
  }  // the block's saved activations are freed here
  tape.push(std::move(name), [forward = std::move(forward), x](const Tensor& dy) {
    Tape recomputed;
    (void)forward(recomputed, x);
    return recomputed.backward(dy);
  });
  return y;
}

}  // namespace qlora::autograd
