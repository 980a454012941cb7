#pragma once
// One attention problem for the attention tests (plain and flash, CPU and CUDA): q [batch, tq, hq, d],
// k and v [batch, tk, hkv, d], lse [batch, hq, tq].
#include <cstdint>

namespace qlora::test {

struct AttentionShape {
  const char* name;
  std::int64_t batch, tq, tk, hq, hkv, d;
  std::int64_t q_size() const { return batch * tq * hq * d; }
  std::int64_t kv_size() const { return batch * tk * hkv * d; }
  std::int64_t lse_size() const { return batch * hq * tq; }
};

}  // namespace qlora::test
