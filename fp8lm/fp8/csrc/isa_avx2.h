// AVX2 + FMA + F16C: 8 float lanes, 16 vector registers. Included inside `namespace avx2` under a
// matching `#pragma GCC target`, before kernels.inc. Same arithmetic as isa_avx512.h.
using vf = __m256;
constexpr int W = 8;
constexpr int kGemvRows = 2;    // 4 vectors per panel row: 2 rows x 4 accumulators fit 16 registers
constexpr int kTileRows = 6;    // the blocked path's microkernel: 6 rows x 2 vectors (12 accumulators)
constexpr int kTileVecs = 2;
constexpr int kScoreRows = 3;   // query rows of attention's q·k microkernel (3 x 4 keys of accumulators)

static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline __m128 vhalves(vf a) {    // lanes i + 4j summed over j: vsum's first steps
  return _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
}
static inline float vsum(vf a) {
  __m128 s = vhalves(a);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <bool E5M2>
static inline vf dequant(const uint8_t* p) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  __m128i h;
  if (E5M2) {
    h = _mm_slli_epi16(_mm_cvtepu8_epi16(b), 8);
  } else {
    h = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(b), 7), _mm_set1_epi16(static_cast<short>(0xBFFF)));
  }
  return _mm256_cvtph_ps(h);
}

template <bool E5M2>
static inline void dequant_row(const uint8_t* p, vf* w) {   // a packed panel row: 32 bytes -> 4 vectors
  for (int v = 0; v < 4; ++v) w[v] = dequant<E5M2>(p + 8 * v);
}

static inline vf vload_bf16(const uint16_t* p) {   // W bfloat16 values, widened (exact)
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline void bf16_row(const uint16_t* p, vf* w) {    // a bfloat16 panel row -> 4 vectors
  for (int v = 0; v < 4; ++v) w[v] = vload_bf16(p + 8 * v);
}

template <bool E5M2>
static inline void store_fp8(uint8_t* p, vf grid) {   // 8 grid floats -> 8 FP8 bytes
  __m128i h = _mm256_cvtps_ph(E5M2 ? grid : _mm256_mul_ps(grid, _mm256_set1_ps(1.0f / 256)), _MM_FROUND_TO_NEAREST_INT);
  if (!E5M2) {
    h = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(h, 8), _mm_set1_epi16(0x80)),
                     _mm_and_si128(_mm_srli_epi16(h, 7), _mm_set1_epi16(0x7F)));
  } else {
    h = _mm_srli_epi16(h, 8);
  }
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(h, _mm_setzero_si128()));
}

static inline vf quantize(vf x, vf inv, vf limit, __m256i mant_shift, __m256i min_spacing) {
  vf y = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(x, inv), _mm256_sub_ps(_mm256_setzero_ps(), limit)), limit);
  __m256i bits = _mm256_and_si256(_mm256_castps_si256(y), _mm256_set1_epi32(0x7F800000));
  __m256i spacing = _mm256_max_epi32(_mm256_sub_epi32(bits, mant_shift), min_spacing);
  vf r = _mm256_round_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_sub_epi32(_mm256_set1_epi32(254 << 23), spacing))),
                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_mul_ps(r, _mm256_castsi256_ps(spacing));
}
static inline __m256i iset1(int32_t a) { return _mm256_set1_epi32(a); }

static inline vf vround(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vscale2(vf y, vf n) {        // n in [-126, 127]: 2^n built from its exponent bits
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
static inline vf vkeep_ge(vf y, vf x, vf lo) { return _mm256_and_ps(y, _mm256_cmp_ps(x, lo, _CMP_GE_OQ)); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline float vhmax(vf a) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static inline int64_t sum_bytes(const uint8_t* p, int64_t n) {   // n: a multiple of 256
  __m256i a[8];
  for (auto& v : a) v = _mm256_setzero_si256();
  for (int64_t i = 0; i < n; i += 256)
    for (int j = 0; j < 8; ++j)
      a[j] = _mm256_add_epi64(a[j], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32 * j)));
  int64_t lanes[4];
  __m256i s = a[0];
  for (int j = 1; j < 8; ++j) s = _mm256_add_epi64(s, a[j]);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), s);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}
