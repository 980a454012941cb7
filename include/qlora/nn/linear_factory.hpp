#pragma once
// make_linear: from a runtime configuration (command line, checkpoint) to the QuantLinear<Base, Adapter>
// instantiation that implements it. The base is a dense tensor or a quantized one (its scheme picks the
// Base policy); the adapter kind picks the Adapter policy.

#include <memory>
#include <string>
#include <variant>

#include "qlora/nn/quant_linear.hpp"

namespace qlora::nn {

using BaseWeight = std::variant<Tensor, quant::QuantizedTensor>;

namespace detail {

template <class Base>
std::unique_ptr<Linear> with_adapter(std::string name, Base base, const AdapterShape& shape, std::uint64_t init_seed,
                                     std::uint64_t stream_id, DType param_dtype) {
  switch (shape.kind) {
    case AdapterKind::none:
      return std::make_unique<QuantLinear<Base, NoAdapter>>(std::move(name), std::move(base), shape, init_seed,
                                                            stream_id, param_dtype);
    case AdapterKind::hira:
      return std::make_unique<QuantLinear<Base, FullPooled>>(std::move(name), std::move(base), shape, init_seed,
                                                             stream_id, param_dtype);
    default:
      return std::make_unique<QuantLinear<Base, LowRank>>(std::move(name), std::move(base), shape, init_seed,
                                                          stream_id, param_dtype);
  }
}

}  // namespace detail

// name: the layer's name (parameter names derive from it); init_seed: the adapter's initial draw; stream_id:
// its dropout stream (distinct per layer); param_dtype: f32 adapter masters (f64 for gradient checks on CPU).
inline std::unique_ptr<Linear> make_linear(std::string name, BaseWeight weight, const AdapterConfig& cfg,
                                           std::uint64_t init_seed, std::uint64_t stream_id,
                                           DType param_dtype = DType::f32) {
  if (auto* dense = std::get_if<Tensor>(&weight)) {
    DenseBase base(std::move(*dense));
    const AdapterShape shape = resolve_adapter(cfg, base.out_features(), base.in_features(), 0, name);
    return detail::with_adapter(std::move(name), std::move(base), shape, init_seed, stream_id, param_dtype);
  }
  quant::QuantizedTensor& q = std::get<quant::QuantizedTensor>(weight);
  const AdapterShape shape = resolve_adapter(cfg, q.rows, q.cols, q.group_size(), name);
  switch (q.config.scheme) {
    case quant::Scheme::nf4:
      return detail::with_adapter(std::move(name), NF4Base(std::move(q)), shape, init_seed, stream_id, param_dtype);
    case quant::Scheme::int_asym:
    case quant::Scheme::int_sym:
      return detail::with_adapter(std::move(name), IntGroupBase(std::move(q)), shape, init_seed, stream_id,
                                  param_dtype);
    case quant::Scheme::dint:
      return detail::with_adapter(std::move(name), DIntBase(std::move(q)), shape, init_seed, stream_id, param_dtype);
  }
  throw Error("make_linear: unknown quantization scheme");
}

}  // namespace qlora::nn
