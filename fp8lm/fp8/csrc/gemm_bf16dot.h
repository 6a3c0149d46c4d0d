// W8A8 matmuls of many rows (prefill) with AVX-512 BF16 dot products. Included inside `namespace
// avx512` after kernels.inc, under a target that adds avx512bf16. FP8 values — the weights
// dequantized, the activations already cast onto the FP8 grid — are exact in bfloat16, and
// vdpbf16ps adds two exact products per float32 lane: the float32 matmul of the same values, its
// sums taken in pairs, with twice the products per instruction of an FMA.

// Lane i: bfloat16(even[i]) in the low half, bfloat16(odd[i]) in the high half (both exact).
static inline __m512i bf16_pairs(vf even, vf odd) {
  return _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(even), 16),
                         _mm512_and_si512(_mm512_castps_si512(odd), _mm512_set1_epi32(static_cast<int>(0xFFFF0000))));
}

// out[MR][kPanel] = sum over k pairs of x pairs (x[m][kp]: rows kp of `x`, ldx apart) times w pairs.
template <int MR>
static inline void dot_tile(const uint32_t* w, const uint32_t* x, int64_t ldx, int64_t K2, float* out) {
  vf acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = vzero();
  for (int64_t kp = 0; kp < K2; ++kp) {
    __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + kp * kPanel), w1 = (__m512bh)_mm512_loadu_si512(w + kp * kPanel + 16);
    for (int m = 0; m < MR; ++m) {
      __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[m * ldx + kp]));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < 2; ++v) vstore(out + m * kPanel + v * 16, acc[m][v]);
}

template <bool E5M2>
static void dot_panels(const LinearArgs& a, const uint32_t* xpairs, int64_t K2, int64_t p0, int64_t p1) {
  std::vector<uint32_t> buf(K2 * kPanel);          // one panel as bfloat16 pairs along K: [K2][32]
  float t[kTileRows * kPanel];
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = static_cast<const uint8_t*>(a.packed) + p * a.K * kPanel;
    for (int64_t kp = 0; kp < K2; ++kp) {
      vf even[2], odd[2] = {vzero(), vzero()};
      dequant_row<E5M2>(panel + 2 * kp * kPanel, even);
      if (2 * kp + 1 < a.K) dequant_row<E5M2>(panel + (2 * kp + 1) * kPanel, odd);
      for (int v = 0; v < 2; ++v)
        _mm512_storeu_si512(buf.data() + kp * kPanel + v * 16, bf16_pairs(even[v], odd[v]));
    }
    for (int64_t m0 = 0; m0 < a.M; m0 += kTileRows) {
      int rows = static_cast<int>(std::min<int64_t>(kTileRows, a.M - m0));
      with_rows<kTileRows>(rows, [&](auto r) { dot_tile<decltype(r)::value>(buf.data(), xpairs + m0 * K2, K2, K2, t); });
      store_tile(t, rows, m0, p * kPanel, a);
    }
  }
}

// linear() for FP8 weights and activations on the FP8 grid (a.x), by bfloat16 dot products.
static void linear_dot(const LinearArgs& a) {
  const int64_t K2 = (a.K + 1) / 2, panels = (a.N + kPanel - 1) / kPanel;
  std::vector<uint32_t> xpairs(a.M * K2);
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(a.x);
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t kp = 0; kp < K2; ++kp) {
      uint32_t even = bits[m * a.K + 2 * kp], odd = 2 * kp + 1 < a.K ? bits[m * a.K + 2 * kp + 1] : 0;
      xpairs[m * K2 + kp] = (even >> 16) | (odd & 0xFFFF0000u);
    }
  at::parallel_for(0, panels, std::max<int64_t>(1, kMinBytesPerTask / (a.K * kPanel)), [&](int64_t p0, int64_t p1) {
    a.format == WeightFormat::kE5M2 ? dot_panels<true>(a, xpairs.data(), K2, p0, p1)
                                    : dot_panels<false>(a, xpairs.data(), K2, p0, p1);
  });
}
