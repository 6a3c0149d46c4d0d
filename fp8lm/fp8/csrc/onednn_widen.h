// Widening fp8lm's FP8 panels into oneDNN's weight layouts (onednn_gemm.cpp): whole panels' rows with
// F16C, as the CPU kernels dequantize, in runs of 8 columns that oneDNN keeps consecutive.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace fp8lm_onednn {

constexpr int kPanel = 32;                  // fp8lm's panels: [ceil(N / 32), K, 32] FP8 bytes

enum class RunLayout { kScattered, kColumns, kPairs };

bool has_avx2_f16c() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"); }

// 8 FP8 bytes -> their values (E4M3: times 2^-8) as float32: an E4M3 byte's exponent and mantissa
// are a half's shifted right by 3 (bias 7 against 15: the 2^-8, subnormals included); an E5M2 byte
// is a half's top byte.
__attribute__((target("avx2,f16c"))) inline __m256 fp8x8(const uint8_t* src, bool e5m2) {
  __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
  __m128i half = e5m2 ? _mm_slli_epi16(b, 8)
                      : _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8),
                                     _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7f)), 7));
  return _mm256_cvtph_ps(half);
}

// The same as bfloat16 bits (the top half of each float32: exact, an FP8 value has 4 significant bits).
__attribute__((target("avx2,f16c"))) inline __m128i fp8x8_bf16(const uint8_t* src, bool e5m2) {
  __m256i bits = _mm256_srli_epi32(_mm256_castps_si256(fp8x8(src, e5m2)), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
}

// One panel row (32 bytes) to its values, each 8 consecutive columns' consecutive from
// dst + n_off[first of them]; with `next` (the following k's row), the two interleaved: 16 values
// (k, n), (k + 1, n), (k, n + 1), ... from there.
template <typename T>
__attribute__((target("avx2,f16c"))) void widen_run(const uint8_t* row, const uint8_t* next, T* base,
                                                    const int64_t* n_off, bool e5m2) {
  for (int j = 0; j < kPanel; j += 8) {
    T* dst = base + n_off[j];
    if constexpr (sizeof(T) == 2) {
      __m128i a = fp8x8_bf16(row + j, e5m2);
      if (!next) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), a);
        continue;
      }
      __m128i b = fp8x8_bf16(next + j, e5m2);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_unpacklo_epi16(a, b));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 8), _mm_unpackhi_epi16(a, b));
    } else {
      __m256 a = fp8x8(row + j, e5m2);
      if (!next) {
        _mm256_storeu_ps(reinterpret_cast<float*>(dst), a);
        continue;
      }
      __m256 b = fp8x8(next + j, e5m2), lo = _mm256_unpacklo_ps(a, b), hi = _mm256_unpackhi_ps(a, b);
      _mm256_storeu_ps(reinterpret_cast<float*>(dst), _mm256_permute2f128_ps(lo, hi, 0x20));
      _mm256_storeu_ps(reinterpret_cast<float*>(dst + 8), _mm256_permute2f128_ps(lo, hi, 0x31));
    }
  }
}

}  // namespace fp8lm_onednn
