// What one layer of the DecodeStack multiplies and attends with, each part in the form the
// layer-by-layer path already computes it, so a decoder mixing FP8 and high-precision parts (an
// unquantized model, or layers a quantized one keeps) runs its decode steps in one call too.
// Included by fp8_cpu.cpp after the kernels' entry points.

// x [B, K] float32 -> [B, N] float32 through one weight: the kernels' FP8 panels (W8A8 with a static
// input scale), their bfloat16 panels (float32 sums), or a oneDNN-packed weight (torch's
// mkldnn::_linear_pointwise, which the modules call; x rounded to the weight's dtype first, as a
// bfloat16 model's activations are).
struct Projection {
  enum class Kind { kFP8, kBF16Panels, kOneDnn };
  Kind kind;
  at::Tensor weight;
  at::Tensor col_scale, row_scale, inv_scale;   // FP8 only
  c10::optional<at::Tensor> bias;               // float32 [N]
  int64_t N;
};

static c10::optional<at::Tensor> float_bias(const c10::optional<at::Tensor>& bias, int64_t N) {
  if (!bias) return c10::nullopt;
  check_float_vector(*bias, "bias", {N});
  return bias;
}

Projection fp8_projection(at::Tensor packed, at::Tensor col_scale, at::Tensor row_scale, at::Tensor inv_scale,
                          c10::optional<at::Tensor> bias) {
  const int64_t N = col_scale.numel();
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(0) == (N + kPanel - 1) / kPanel,
              "decode stack: FP8 panels must be uint8 [ceil(N / 32), K, 32] for ", N, " column scales");
  check_float_vector(row_scale, "row_scale", {1});
  check_float_vector(inv_scale, "inv_scale", {1});
  return Projection{Projection::Kind::kFP8, packed, col_scale, row_scale, inv_scale, float_bias(bias, N), N};
}

Projection bf16_projection(at::Tensor panels, int64_t N, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(panels.scalar_type() == at::kBFloat16 && panels.dim() == 3 && panels.size(0) == (N + kPanel - 1) / kPanel,
              "decode stack: bfloat16 panels must be [ceil(N / 32), K, 32] for N=", N);
  return Projection{Projection::Kind::kBF16Panels, panels, {}, {}, {}, float_bias(bias, N), N};
}

Projection onednn_projection(at::Tensor packed, int64_t N, c10::optional<at::Tensor> bias) {
  TORCH_CHECK((packed.scalar_type() == at::kFloat || packed.scalar_type() == at::kBFloat16) && packed.dim() == 2 &&
              packed.size(0) == N, "decode stack: a oneDNN-packed weight must be float32 or bfloat16 [N, K] for N=", N);
  return Projection{Projection::Kind::kOneDnn, packed, {}, {}, {}, float_bias(bias, N), N};
}

static at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& packed) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, c10::string_view,
                        c10::List<c10::optional<at::Scalar>>, c10::optional<c10::string_view>)>();
  return op.call(x, packed, c10::nullopt, "none", c10::List<c10::optional<at::Scalar>>(), c10::string_view(""));
}

// A layer's attention: FP8 (paged_attention's 8 scales, the FP8 cache's write scales and whether K/V
// are cast onto the matmuls' grids again) or plain (softmax(q·kᵀ·scale + bias)·v in float32).
struct LayerAttention {
  bool fp8;
  std::vector<double> scales;         // FP8: paged_attention's 8; plain: {scale}
  double k_inv_scale, v_inv_scale;    // 1 / an FP8 cache's scales; 1 for a float32 one
  bool requantize_k, requantize_v;
};

LayerAttention fp8_attention(std::vector<double> scales, double k_inv_scale, double v_inv_scale, bool requantize_k,
                             bool requantize_v) {
  TORCH_CHECK(scales.size() == 8, "decode stack: FP8 attention takes 8 scales");
  return LayerAttention{true, scales, k_inv_scale, v_inv_scale, requantize_k, requantize_v};
}

LayerAttention plain_attention(double scale) { return LayerAttention{false, {scale}, 1.0, 1.0, false, false}; }
