// AVX-512 (F, BW, VL) + FMA + F16C: 16 float lanes. Included inside `namespace avx512` under a
// matching `#pragma GCC target`, before kernels.inc.
using vf = __m512;
constexpr int W = 16;
constexpr int kGemvRows = 8;    // activation rows the fused GEMV keeps in registers (2 x 8 accumulators)
constexpr int kTileRows = 12;   // rows of the blocked path's microkernel (24 accumulators)
constexpr int kTileVecs = 2;    // its vectors of columns: the whole panel
constexpr int kScoreRows = 4;   // query rows of attention's q·k microkernel (4 x 4 keys of accumulators)

static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline __m128 vhalves(vf a) {    // lanes i + 4j summed over j: vsum's first steps
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
static inline float vsum(vf a) {        // the order of isa_avx2.h's vsum (and of vsum4 in kernels.inc)
  __m128 s = vhalves(a);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 16 FP8 bytes -> 16 floats. E4M3: the half-precision bits (b & 0x80) << 8 | (b & 0x7F) << 7 are the
// FP8 value times 2^-8, subnormals included; sign-extending b to 16 bits and shifting left by 7 puts
// the sign in bit 15 and the magnitude in bits 14..7, and bit 14 (a copy of the sign) is cleared.
// E5M2 is the top byte of a half.
template <bool E5M2>
static inline vf dequant(const uint8_t* p) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m256i h;
  if (E5M2) {
    h = _mm256_slli_epi16(_mm256_cvtepu8_epi16(b), 8);
  } else {
    h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7), _mm256_set1_epi16(static_cast<short>(0xBFFF)));
  }
  return _mm512_cvtph_ps(h);
}

// A packed panel row (32 bytes) -> 2 vectors, with one load and one widening for both.
template <bool E5M2>
static inline void dequant_row(const uint8_t* p, vf* w) {
  __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  __m512i h;
  if (E5M2) {
    h = _mm512_slli_epi16(_mm512_cvtepu8_epi16(b), 8);
  } else {
    h = _mm512_and_si512(_mm512_slli_epi16(_mm512_cvtepi8_epi16(b), 7), _mm512_set1_epi16(static_cast<short>(0xBFFF)));
  }
  w[0] = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
  w[1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}

// A bfloat16 is the top half of a float32: W of them widened (exact).
static inline vf vload_bf16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline void bf16_row(const uint16_t* p, vf* w) {   // a bfloat16 panel row (32 values) -> 2 vectors
  for (int v = 0; v < 2; ++v) w[v] = vload_bf16(p + 16 * v);
}

// 16 floats already on the FP8 grid -> their 16 FP8 bytes (the inverse of dequant: exact).
template <bool E5M2>
static inline void store_fp8(uint8_t* p, vf grid) {
  __m256i h = _mm512_cvtps_ph(E5M2 ? grid : _mm512_mul_ps(grid, _mm512_set1_ps(1.0f / 256)), _MM_FROUND_TO_NEAREST_INT);
  if (!E5M2) {
    h = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(h, 8), _mm256_set1_epi16(0x80)),
                        _mm256_and_si256(_mm256_srli_epi16(h, 7), _mm256_set1_epi16(0x7F)));
  } else {
    h = _mm256_srli_epi16(h, 8);
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtepi16_epi8(h));
}

// y = x * inv saturated to +-limit and rounded half-to-even onto the FP8 grid (see numerics.py).
static inline vf quantize(vf x, vf inv, vf limit, __m512i mant_shift, __m512i min_spacing) {
  vf y = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x, inv), _mm512_sub_ps(_mm512_setzero_ps(), limit)), limit);
  __m512i bits = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(0x7F800000));
  __m512i spacing = _mm512_max_epi32(_mm512_sub_epi32(bits, mant_shift), min_spacing);
  vf r = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_sub_epi32(_mm512_set1_epi32(254 << 23), spacing))),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_mul_ps(r, _mm512_castsi512_ps(spacing));
}
static inline __m512i iset1(int32_t a) { return _mm512_set1_epi32(a); }

// For vexp (kernels.inc): round to nearest, y * 2^n for integral n, y where x >= lo else 0.
static inline vf vround(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vscale2(vf y, vf n) { return _mm512_scalef_ps(y, n); }
static inline vf vkeep_ge(vf y, vf x, vf lo) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ), y); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline float vhmax(vf a) { return _mm512_reduce_max_ps(a); }

static inline int64_t sum_bytes(const uint8_t* p, int64_t n) {   // n: a multiple of 256
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < n; i += 256) {
    a0 = _mm512_add_epi64(a0, _mm512_loadu_si512(p + i));
    a1 = _mm512_add_epi64(a1, _mm512_loadu_si512(p + i + 64));
    a2 = _mm512_add_epi64(a2, _mm512_loadu_si512(p + i + 128));
    a3 = _mm512_add_epi64(a3, _mm512_loadu_si512(p + i + 192));
  }
  return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
}
