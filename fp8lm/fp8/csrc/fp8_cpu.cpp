// fp8lm's CPU FP8 kernels: FP8 weight x float32 activation matmul (the activation's static FP8
// cast fused in), for decode (a GEMV that dequantizes in registers) and prefill (dequantized
// panels into a register-blocked microkernel). One source, compiled for AVX-512 and AVX2; the
// caller picks the ISA at run time (`isa()` reports what this CPU supports).
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>   // at::Tensor <-> torch.Tensor (not torch/extension.h: half the compile time)
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>   // the stack calls oneDNN-packed Linears as torch does
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace fp8lm {

constexpr int kPanel = 32;                  // output rows per packed weight panel
constexpr int64_t kFusedMaxRows = 8;        // up to this many activation rows: the fused GEMV
constexpr int64_t kMinBytesPerTask = 1 << 16;

enum class WeightFormat { kE4M3, kE5M2, kBF16 };

constexpr int64_t weight_bytes(WeightFormat f) { return f == WeightFormat::kBF16 ? 2 : 1; }

struct LinearArgs {
  const float* x;          // [M, K] activation rows, already on the FP8 grid for W8A8
  const void* packed;      // [ceil(N / 32), K, 32] weights: FP8 bytes, or bfloat16 values
  const float* col_scale;  // [N] per output channel (E4M3: times 256, see dequant); nullptr: none (bfloat16)
  const float* row_scale;  // [row_scale_n] per activation row, or one for all (unused without col_scale)
  int64_t row_scale_n;
  const float* bias;       // [N] or nullptr
  float* y;                // [M, N]
  int64_t M, K, N;
  WeightFormat format;
};

struct QuantArgs {
  const float* inv_scale;  // [inv_scale_n]
  int64_t inv_scale_n;
  float limit;
  int mantissa_bits, min_exponent;
};

struct FP8Operand {       // the second operand of an attention matmul, read from the FP8 cache
  float cache_scale;     // the cache's scale (E4M3: times 256, see dequant)
  float inv_scale;       // 1 / the matmul's scale for this operand
  bool requantize;       // cast onto the FP8 grid again (the scales differ)
};

// What a paged K/V cache holds: FP8 bytes, or the model's float32 / bfloat16 values.
enum class CacheElement { kFP8, kFloat32, kBFloat16 };

struct DecodeArgs {
  const float* q;                 // [batch, queries, num_heads, head_dim], rotated, before the 1/sqrt(d) scale
  const uint8_t* k_cache;         // [num_kv_heads, num_cache_blocks, block_size, head_dim] of `element`s
  const uint8_t* v_cache;
  const int64_t* block_tables;    // [batch, max_blocks]
  const float* bias;              // [batch, queries, max_blocks * block_size]: 0 or -inf
  float* out;                     // [batch, queries, num_heads, head_dim]
  int64_t batch, queries, num_heads, num_kv_heads, head_dim, num_cache_blocks, block_size, max_blocks;
  bool e5m2;
  QuantArgs grid;                 // limit and format of every FP8 cast (its scale is per call)
  float q_scale, qk_inv_a, qk_out_scale, softmax_inv, softmax_scale, av_inv_a, av_out_scale;
  FP8Operand k, v;
  // exact_first_token: [kv_heads, first_rows, head_dim] unrounded K and V, one row per cache block
  // (its first slot's token); key 0 of a sequence is row block_tables[b][0]. nullptr: none.
  const float* first_k = nullptr;
  const float* first_v = nullptr;
  int64_t first_rows = 0;
  CacheElement element = CacheElement::kFP8;
  bool fp8_casts = true;          // the FP8 modules' arithmetic; false: the plain modules' (no casts, no scales)
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
#include "isa_avx512.h"
#include "kernels.inc"
#include "attention.inc"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#include "gemm_bf16dot.h"
#pragma GCC pop_options
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#include "isa_avx2.h"
#include "kernels.inc"
#include "attention.inc"
}  // namespace avx2
#pragma GCC pop_options

// kAvx512Bf16: AVX-512 plus its BF16 dot products, which only the W8A8 matmuls of many rows use.
enum Isa { kNone = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// `call` (a kernel call) in the namespace compiled for `isa`: avx512:: or avx2::.
#define FP8LM_ISA_CALL(isa, call) ((isa) >= kAvx512 ? avx512::call : avx2::call)

int64_t isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return __builtin_cpu_supports("avx512bf16") ? kAvx512Bf16 : kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return kAvx2;
  return kNone;
}

static void check_isa(int64_t want) {
  TORCH_CHECK(want >= kAvx2 && want <= kAvx512Bf16,
              "fp8lm kernels: isa must be 1 (AVX2), 2 (AVX-512) or 3 (AVX-512 BF16), got ", want);
  TORCH_CHECK(want <= isa(), "fp8lm kernels: this CPU lacks the instruction set ",
              want == kAvx512Bf16 ? "AVX-512 BF16" : want == kAvx512 ? "AVX-512" : "AVX2");
}

static void check_float_vector(const at::Tensor& t, const char* name, std::initializer_list<int64_t> sizes) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.is_contiguous(),
              name, " must be a contiguous 1-D float32 tensor");
  TORCH_CHECK(std::find(sizes.begin(), sizes.end(), t.numel()) != sizes.end(), name, " has ", t.numel(),
              " elements, which does not fit the matmul's shapes");
}

// x [M, K] contiguous float32 against weight panels [ceil(N / 32), K, 32] of `dtype`.
static void check_matmul_operands(const at::Tensor& x, const at::Tensor& packed, int64_t N,
                                  at::ScalarType dtype, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(packed.scalar_type() == dtype && packed.dim() == 3 && packed.is_contiguous() && packed.size(2) == kPanel,
              "packed weights must be contiguous ", c10::toString(dtype), " [panels, K, 32]");
  TORCH_CHECK(packed.size(1) == x.size(1), "x has K=", x.size(1), " but the weights have K=", packed.size(1));
  TORCH_CHECK(N > 0 && (N + kPanel - 1) / kPanel == packed.size(0), "N=", N, " does not match ",
              packed.size(0), " weight panels");
  if (bias) check_float_vector(*bias, "bias", {N});
}

// x [M, K] float32 (contiguous) @ dequant(packed)ᵀ -> [M, N] float32.
// inv_scale: optional [1] or [M]: x is first cast to FP8 values of x * inv_scale (W8A8).
// row_scale: [1] or [M], multiplies row m of the result; col_scale: [N]; bias: optional [N].
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t N, bool e5m2,
                     const at::Tensor& col_scale, const at::Tensor& row_scale,
                     const c10::optional<at::Tensor>& inv_scale, double limit, int64_t mantissa_bits,
                     int64_t min_exponent, const c10::optional<at::Tensor>& bias, int64_t want_isa) {
  check_isa(want_isa);
  check_matmul_operands(x, packed, N, at::kByte, bias);
  const int64_t M = x.size(0), K = x.size(1);
  check_float_vector(col_scale, "col_scale", {N});
  check_float_vector(row_scale, "row_scale", {1, M});

  at::Tensor xq = x;
  if (inv_scale) {
    check_float_vector(*inv_scale, "inv_scale", {1, M});
    xq = at::empty_like(x);
    QuantArgs q{inv_scale->data_ptr<float>(), inv_scale->numel(), static_cast<float>(limit),
                static_cast<int>(mantissa_bits), static_cast<int>(min_exponent)};
    FP8LM_ISA_CALL(want_isa, quantize_rows(x.data_ptr<float>(), M, K, q, xq.data_ptr<float>()));
  }
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  LinearArgs a{xq.data_ptr<float>(), packed.data_ptr<uint8_t>(), col_scale.data_ptr<float>(),
               row_scale.data_ptr<float>(), row_scale.numel(), bias ? bias->data_ptr<float>() : nullptr,
               y.data_ptr<float>(), M, K, N, e5m2 ? WeightFormat::kE5M2 : WeightFormat::kE4M3};
  if (want_isa == kAvx512Bf16 && inv_scale && M > kFusedMaxRows) {
    avx512::linear_dot(a);              // x is on the FP8 grid: exact in bfloat16
  } else {
    FP8LM_ISA_CALL(want_isa, linear(a));
  }
  return y;
}

// x [M, K] float32 (contiguous) @ Wᵀ for a bfloat16 weight in the same panels -> [M, N] float32:
// float32 products and sums, as a float32 matmul of the bfloat16 weight's values.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed, int64_t N,
                          const c10::optional<at::Tensor>& bias, int64_t want_isa) {
  check_isa(want_isa);
  check_matmul_operands(x, packed, N, at::kBFloat16, bias);
  const int64_t M = x.size(0), K = x.size(1);
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  LinearArgs a{x.data_ptr<float>(), packed.data_ptr(), nullptr, nullptr, 1,   // unscaled sums
               bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), M, K, N, WeightFormat::kBF16};
  FP8LM_ISA_CALL(want_isa, linear(a));
  return y;
}

// x cast onto the FP8 grid: the FP8 values of x * inv_scale (saturated at +-limit), as float32.
at::Tensor fake_quant(const at::Tensor& x, double inv_scale, double limit, int64_t mantissa_bits,
                         int64_t min_exponent, int64_t want_isa) {
  check_isa(want_isa);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "fake_quant takes a contiguous float32 tensor");
  auto out = at::empty_like(x);
  const int64_t cols = x.dim() ? x.size(-1) : 1;
  if (x.numel() == 0) return out;
  const float inv = static_cast<float>(inv_scale);
  QuantArgs q{&inv, 1, static_cast<float>(limit), static_cast<int>(mantissa_bits), static_cast<int>(min_exponent)};
  FP8LM_ISA_CALL(want_isa, quantize_rows(x.data_ptr<float>(), x.numel() / cols, cols, q, out.data_ptr<float>()));
  return out;
}

// K or V as a matmul operand: the cached bytes (cache_byte_scale: the cache's scale times the byte
// factor of dequant) cast onto the matmul's grid (operand_scale) where `requantize`. Where both scales
// are the same float that cast returns the cached FP8 values themselves (the two float32 products
// move them by a few ulps, far less than half an FP8 spacing; no value can pass the limit it was
// written with), so they are read as they are: bit for bit the same operand, without the cast.
static FP8Operand cache_operand(double cache_byte_scale, double operand_scale, bool e5m2, bool requantize) {
  const double byte_factor = e5m2 ? 1.0 : 256.0;
  if (requantize && static_cast<float>(cache_byte_scale) == static_cast<float>(operand_scale * byte_factor))
    return FP8Operand{static_cast<float>(byte_factor), 1.0f, false};
  return FP8Operand{static_cast<float>(cache_byte_scale), static_cast<float>(1.0 / operand_scale), requantize};
}

// What both attention entry points check and fix: q [B, heads, d] for a decode step, or
// [B, L, heads, d] for L padded queries per sequence with bias [B, L, S]; caches [kv_heads, blocks,
// block_size, d] of one shape; first_kv (exact_first_token) [2, kv_heads, >= blocks, d].
static DecodeArgs attention_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& block_tables, const at::Tensor& bias, int64_t num_kv_heads,
                                 int64_t want_isa, const c10::optional<at::Tensor>& first_kv, const at::Tensor& out) {
  check_isa(want_isa);
  TORCH_CHECK(q.scalar_type() == at::kFloat && (q.dim() == 3 || q.dim() == 4) && q.is_contiguous(),
              "q must be contiguous float32 [B, heads, d] or [B, L, heads, d]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
              "K/V caches must be contiguous [kv_heads, blocks, block_size, d] of one shape and type");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.is_contiguous(),
              "block_tables must be contiguous int64 [B, max_blocks]");
  const int64_t B = q.size(0), L = q.dim() == 4 ? q.size(1) : 1, H = q.size(-2), d = q.size(-1);
  const int64_t W = want_isa >= kAvx512 ? 16 : 8;
  TORCH_CHECK(d % W == 0 && k_cache.size(3) == d && k_cache.size(0) == num_kv_heads && H % num_kv_heads == 0,
              "head_dim must be a multiple of ", W, " and the caches must match q");
  TORCH_CHECK(block_tables.size(0) == B, "block_tables must have one row per sequence");
  const int64_t S = block_tables.size(1) * k_cache.size(2);
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == B * L * S,
              "bias must be contiguous float32 [B, L, max_blocks * block_size]");
  DecodeArgs a{};
  a.q = q.data_ptr<float>();
  a.k_cache = static_cast<const uint8_t*>(k_cache.data_ptr());
  a.v_cache = static_cast<const uint8_t*>(v_cache.data_ptr());
  a.block_tables = block_tables.data_ptr<int64_t>();
  a.bias = bias.data_ptr<float>();
  a.out = out.data_ptr<float>();
  a.batch = B, a.queries = L, a.num_heads = H, a.num_kv_heads = num_kv_heads, a.head_dim = d;
  a.num_cache_blocks = k_cache.size(1), a.block_size = k_cache.size(2), a.max_blocks = block_tables.size(1);
  if (first_kv) {
    TORCH_CHECK(first_kv->scalar_type() == at::kFloat && first_kv->is_contiguous() && first_kv->dim() == 4 &&
                first_kv->size(0) == 2 && first_kv->size(1) == num_kv_heads && first_kv->size(2) >= k_cache.size(1) &&
                first_kv->size(3) == d, "first_kv must be contiguous float32 [2, kv_heads, >= cache blocks, d]");
    a.first_rows = first_kv->size(2);
    a.first_k = first_kv->data_ptr<float>();
    a.first_v = a.first_k + num_kv_heads * a.first_rows * d;
  }
  return a;
}

// FP8 attention over the paged cache (see attention.inc paged_attention). scales: q_scale, qk_a,
// qk_b, softmax_out, av_a, av_b (the FP8 modules' scales), then the K and V cache scales (E4M3: times
// 256, see dequant); requantize_k/v: cast K/V onto the grid again (FP8Matmul does unless it can skip it).
// A float32 cache (the model's K/V, not FP8) is always cast onto the matmuls' grids; its scales are unused.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_tables, const at::Tensor& bias, bool e5m2,
                               std::vector<double> scales, bool requantize_k, bool requantize_v, double limit,
                               int64_t mantissa_bits, int64_t min_exponent, int64_t num_kv_heads, int64_t want_isa,
                               const c10::optional<at::Tensor>& first_kv) {
  const bool fp8_cache = k_cache.scalar_type() == at::kByte;
  TORCH_CHECK(fp8_cache || k_cache.scalar_type() == at::kFloat,
              "the K/V caches of FP8 attention must be FP8 bytes (uint8) or float32");
  TORCH_CHECK(scales.size() == 8, "paged_attention takes 8 scales");
  auto out = at::empty_like(q);
  DecodeArgs a = attention_args(q, k_cache, v_cache, block_tables, bias, num_kv_heads, want_isa, first_kv, out);
  const double qk_a = scales[1], qk_b = scales[2], sm = scales[3], av_a = scales[4], av_b = scales[5];
  a.e5m2 = e5m2;
  a.grid = QuantArgs{nullptr, 1, static_cast<float>(limit), static_cast<int>(mantissa_bits), static_cast<int>(min_exponent)};
  a.q_scale = static_cast<float>(scales[0]), a.qk_inv_a = static_cast<float>(1.0 / qk_a);
  a.qk_out_scale = static_cast<float>(qk_a * qk_b);
  a.softmax_inv = static_cast<float>(1.0 / sm), a.softmax_scale = static_cast<float>(sm);
  a.av_inv_a = static_cast<float>(1.0 / av_a), a.av_out_scale = static_cast<float>(av_a * av_b);
  if (fp8_cache) {
    a.k = cache_operand(scales[6], qk_b, e5m2, requantize_k);
    a.v = cache_operand(scales[7], av_b, e5m2, requantize_v);
  } else {
    a.element = CacheElement::kFloat32;
    a.k = FP8Operand{1.0f, static_cast<float>(1.0 / qk_b), true};
    a.v = FP8Operand{1.0f, static_cast<float>(1.0 / av_b), true};
  }
  FP8LM_ISA_CALL(want_isa, paged_attention(a));
  return out;
}

// Attention over a float32 or bfloat16 paged cache, as PagedAttention's plain modules compute it
// (q·kᵀ times `scale`, + bias, softmax, p·v) with float32 arithmetic throughout; shapes as above.
at::Tensor plain_paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& block_tables, const at::Tensor& bias, double scale,
                                 int64_t num_kv_heads, int64_t want_isa, const c10::optional<at::Tensor>& first_kv) {
  const auto type = k_cache.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16, "plain K/V caches must be float32 or bfloat16");
  auto out = at::empty_like(q);
  DecodeArgs a = attention_args(q, k_cache, v_cache, block_tables, bias, num_kv_heads, want_isa, first_kv, out);
  a.element = type == at::kFloat ? CacheElement::kFloat32 : CacheElement::kBFloat16;
  a.fp8_casts = false;
  a.q_scale = static_cast<float>(scale);
  a.qk_out_scale = a.softmax_scale = a.av_out_scale = 1.0f;
  a.k = a.v = FP8Operand{1.0f, 1.0f, false};
  FP8LM_ISA_CALL(want_isa, paged_attention(a));
  return out;
}

// Writes new K or V rows x [T, kv_heads, d] into the paged FP8 cache [kv_heads, blocks, block_size, d]
// at `slots` [T] (slot = block * block_size + offset): FP8 bytes of x * inv_scale, saturated at limit.
void write_cache(const at::Tensor& x, at::Tensor& cache, const at::Tensor& slots, bool e5m2, double inv_scale,
                 double limit, int64_t mantissa_bits, int64_t min_exponent, int64_t want_isa) {
  check_isa(want_isa);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.is_contiguous(), "x must be contiguous float32 [T, kv_heads, d]");
  TORCH_CHECK(cache.scalar_type() == at::kByte && cache.dim() == 4 && cache.is_contiguous(),
              "the cache must be contiguous uint8 [kv_heads, blocks, block_size, d]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.is_contiguous() && slots.numel() == x.size(0),
              "slots must be contiguous int64 [T]");
  const int64_t T = x.size(0), heads = x.size(1), d = x.size(2), num_slots = cache.size(1) * cache.size(2);
  TORCH_CHECK(cache.size(0) == heads && cache.size(3) == d, "x and the cache disagree on kv_heads or head_dim");
  const int64_t* s = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(s[t] >= 0 && s[t] < num_slots, "slot ", s[t], " outside the cache's ", num_slots);
  uint8_t* base = cache.data_ptr<uint8_t>();
  auto dst_row = [&](int64_t r) { return base + ((r % heads) * num_slots + s[r / heads]) * d; };
  QuantArgs grid{nullptr, 1, static_cast<float>(limit), static_cast<int>(mantissa_bits), static_cast<int>(min_exponent)};
  const float inv = static_cast<float>(inv_scale);
  const float* src = x.data_ptr<float>();
  e5m2 ? FP8LM_ISA_CALL(want_isa, write_fp8_rows<true>(src, T * heads, d, inv, grid, dst_row))
       : FP8LM_ISA_CALL(want_isa, write_fp8_rows<false>(src, T * heads, d, inv, grid, dst_row));
}

// float32 values of FP8 bytes times `scale` (E4M3: the caller folds 256 into it).
at::Tensor dequantize(const at::Tensor& src, bool e5m2, double scale, int64_t want_isa) {
  check_isa(want_isa);
  TORCH_CHECK(src.scalar_type() == at::kByte && src.is_contiguous(), "dequantize takes contiguous uint8 bytes");
  auto out = at::empty(src.sizes(), src.options().dtype(at::kFloat));
  const uint8_t* p = src.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  e5m2 ? FP8LM_ISA_CALL(want_isa, dequantize<true>(p, src.numel(), s, o))
       : FP8LM_ISA_CALL(want_isa, dequantize<false>(p, src.numel(), s, o));
  return out;
}

// Reads every byte of `t` once across the thread pool (a read-bandwidth probe for benchmarks).
int64_t read_all(const at::Tensor& t, int64_t want_isa) {
  check_isa(want_isa);
  TORCH_CHECK(t.scalar_type() == at::kByte && t.is_contiguous(), "read_all takes a contiguous uint8 tensor");
  constexpr int64_t kChunk = 1 << 20;
  const int64_t chunks = t.numel() / kChunk;
  TORCH_CHECK(chunks > 0, "read_all needs at least 1 MiB");
  const uint8_t* p = t.data_ptr<uint8_t>();
  std::vector<int64_t> sums(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      sums[c] = FP8LM_ISA_CALL(want_isa, sum_bytes(p + c * kChunk, kChunk));
  });
  int64_t total = 0;
  for (int64_t s : sums) total += s;
  return total;
}

#include "decode_parts.h"
#include "decode_stack.h"

}  // namespace fp8lm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels touch no Python objects: other Python threads (the server's HTTP side) run meanwhile.
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("isa", &fp8lm::isa, "best instruction set this CPU runs: 0 none, 1 AVX2, 2 AVX-512, 3 AVX-512 BF16");
  m.def("linear", &fp8lm::linear, "FP8-weight matmul over packed panels", release());
  m.def("linear_bf16", &fp8lm::linear_bf16, "bfloat16-weight matmul over packed panels", release());
  m.def("paged_attention", &fp8lm::paged_attention, "FP8 attention over the paged cache (decode steps, prompt chunks)",
        release());
  m.def("plain_paged_attention", &fp8lm::plain_paged_attention,
        "attention over a float32 / bfloat16 paged cache (decode steps, prompt chunks)", release());
  m.def("write_cache", &fp8lm::write_cache, "new K/V rows -> FP8 bytes in the paged cache", release());
  m.def("fake_quant", &fp8lm::fake_quant, "float32 -> FP8 grid values (as float32)", release());
  m.def("dequantize", &fp8lm::dequantize, "FP8 bytes -> float32 times a scale", release());
  m.def("read_all", &fp8lm::read_all, "reads a uint8 tensor once (bandwidth probe)", release());
  m.attr("PANEL") = fp8lm::kPanel;
  py::class_<fp8lm::Projection>(m, "Projection", "one matmul of a DecodeStack layer");
  m.def("fp8_projection", &fp8lm::fp8_projection);
  m.def("bf16_projection", &fp8lm::bf16_projection);
  m.def("onednn_projection", &fp8lm::onednn_projection);
  py::class_<fp8lm::LayerAttention>(m, "LayerAttention", "a DecodeStack layer's attention");
  m.def("fp8_attention", &fp8lm::fp8_attention);
  m.def("plain_attention", &fp8lm::plain_attention);
  py::class_<fp8lm::DecodeStack>(m, "DecodeStack", "a whole decoder's decode step in one call")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, bool, double, int64_t, int64_t, int64_t>())
      .def("add_layer", &fp8lm::DecodeStack::add_layer)
      .def("bind_caches", &fp8lm::DecodeStack::bind_caches)
      .def("num_layers", &fp8lm::DecodeStack::num_layers)
      .def("forward", &fp8lm::DecodeStack::forward, release());
}
