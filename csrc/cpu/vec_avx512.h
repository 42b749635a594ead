#pragma once
// Vec for AVX-512 (F, BW, VL, DQ): 16 floats per 512-bit register, opmasks for the tails.
// Included only by variant_avx512.cpp; chosen at run time only when CPUID and XCR0 allow it.
#include <immintrin.h>

#include <cstdint>

#define LLAMAS_PANEL_AHEAD_ROWS 32  // decode tiles ask for their weights ahead: see gemm_ahead_impl.h

namespace {

struct Vec {
  static constexpr int W = 16;
  __m512 v;

  static __mmask16 tail_mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec set1(float x) { return {_mm512_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec load_partial(const float* p, int n) { return {_mm512_maskz_loadu_ps(tail_mask(n), p)}; }
  static Vec widen_bf16(__m256i h) {
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
  }
  static Vec load_bf16(const uint16_t* p) {
    return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static Vec load_bf16_partial(const uint16_t* p, int n) {
    return widen_bf16(_mm256_maskz_loadu_epi16(tail_mask(n), p));
  }
  // One interleaved bfloat16 panel row (see bf16_panel_slot) into one register, column c in lane c.
  static void load_bf16_panel(const uint16_t* row, Vec* out) {
    const __m512i slot = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    out[0].v = _mm512_permutexvar_ps(slot, load_bf16(row).v);
  }
  // 16 int8 (an int8 panel row) as floats.
  static Vec load_i8(const int8_t* p) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store_partial(float* p, int n) const { _mm512_mask_storeu_ps(p, tail_mask(n), v); }

  friend Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
  friend Vec operator/(Vec a, Vec b) { return {_mm512_div_ps(a.v, b.v)}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec sqrt(Vec a) { return {_mm512_sqrt_ps(a.v)}; }
  static Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
  static Vec min(Vec a, Vec b) { return {_mm512_min_ps(a.v, b.v)}; }
  static Vec select_first(int n, Vec a, Vec b) { return {_mm512_mask_blend_ps(tail_mask(n), b.v, a.v)}; }
  static Vec pow2i(Vec n) {
    __m512i i = _mm512_cvtps_epi32(n.v);
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(i, _mm512_set1_epi32(127)), 23))};
  }
  static Vec round(Vec a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }

  float reduce_add() const {
    __m256 lo = _mm512_castps512_ps256(v);
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    __m256 s8 = _mm256_add_ps(lo, hi);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // Whether any lane is above x or NaN (unordered): when not, max(x, reduce_max()) is x exactly.
  bool any_above(float x) const { return _mm512_cmp_ps_mask(v, _mm512_set1_ps(x), _CMP_NLE_UQ) != 0; }
  float reduce_max() const {
    __m256 lo = _mm512_castps512_ps256(v);
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    __m256 s8 = _mm256_max_ps(lo, hi);
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

// Transposes a 16x16 block held in 16 registers: 16 unpacks, 16 in-lane shuffles, then 24
// 128-bit lane shuffles (56 shuffles for 256 floats).
inline void transpose_square(Vec* r) {
  __m512 t[16], s[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i].v, r[i + 1].v);
    t[i + 1] = _mm512_unpackhi_ps(r[i].v, r[i + 1].v);
  }
  // s[4g + c] holds, in 128-bit lane L, rows 4g..4g+3 of column 4L + c.
  for (int g = 0; g < 4; ++g) {
    s[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    s[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    s[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    s[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    __m512 even_lo = _mm512_shuffle_f32x4(s[c], s[4 + c], 0x88);   // L0, L2 of rows 0-7
    __m512 even_hi = _mm512_shuffle_f32x4(s[8 + c], s[12 + c], 0x88);
    __m512 odd_lo = _mm512_shuffle_f32x4(s[c], s[4 + c], 0xDD);    // L1, L3 of rows 0-7
    __m512 odd_hi = _mm512_shuffle_f32x4(s[8 + c], s[12 + c], 0xDD);
    r[c].v = _mm512_shuffle_f32x4(even_lo, even_hi, 0x88);
    r[8 + c].v = _mm512_shuffle_f32x4(even_lo, even_hi, 0xDD);
    r[4 + c].v = _mm512_shuffle_f32x4(odd_lo, odd_hi, 0x88);
    r[12 + c].v = _mm512_shuffle_f32x4(odd_lo, odd_hi, 0xDD);
  }
}

constexpr int kGemmRows = 12;      // MR: 12 rows x 2 registers = 24 accumulators of 32 zmm
constexpr const char* kVariantName = "avx512";

}  // namespace
