#pragma once
// The quantized weight formats in one include: QuantConfig and QuantizedTensor (format.hpp), quantize,
// dequantize / dequantize_rows_into, gemv. The API is summarised at the top of format.hpp.

#include "qlora/quant/dequantize.hpp"
#include "qlora/quant/format.hpp"
#include "qlora/quant/gemv.hpp"
#include "qlora/quant/quantize.hpp"
