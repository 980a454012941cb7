#pragma once
// Every Tensor-level op: include this for the whole ops layer.
#include "qlora/ops/adamw.hpp"
#include "qlora/ops/attention.hpp"
#include "qlora/ops/cross_entropy.hpp"
#include "qlora/ops/elementwise.hpp"
#include "qlora/ops/embedding.hpp"
#include "qlora/ops/matmul.hpp"
#include "qlora/ops/random.hpp"
#include "qlora/ops/reduce.hpp"
#include "qlora/ops/rmsnorm.hpp"
#include "qlora/ops/rope.hpp"
#include "qlora/ops/softmax.hpp"
