#pragma once
// Vec for AArch64 Advanced SIMD (NEON, part of every ARMv8-A core, so no run-time check): 8
// floats in two 128-bit registers. W = 8 as in the AVX2 and generic variants, so the kernels keep
// their 16-column panels (2 Vecs = 4 registers a panel row) and their tile shapes; AArch64 has 32
// vector registers, twice AVX2's 16, which is what a Vec of two registers needs. Every operation
// rounds as its x86 counterpart does (FMA fused, max/min picking the second operand on NaN, the
// same pairwise reduction tree), so the variants agree bit for bit. Included only by
// variant_neon.cpp; everything here has internal linkage.
#include <arm_neon.h>

#include <cstdint>

namespace {

struct Vec {
  static constexpr int W = 8;
  float32x4_t lo, hi;  // lanes 0-3, 4-7

  static Vec zero() { return set1(0.0f); }
  static Vec set1(float x) { return {vdupq_n_f32(x), vdupq_n_f32(x)}; }
  static Vec load(const float* p) { return {vld1q_f32(p), vld1q_f32(p + 4)}; }
  static Vec load_partial(const float* p, int n) {
    float tmp[W] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < n; ++i) tmp[i] = p[i];
    return load(tmp);
  }
  // bfloat16 is the top half of a float32: widen by shifting 16 bits left.
  static Vec load_bf16(const uint16_t* p) {
    const uint16x8_t h = vld1q_u16(p);
    return {vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16)),
            vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(h), 16))};
  }
  static Vec load_bf16_partial(const uint16_t* p, int n) {
    uint16_t tmp[W] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < n; ++i) tmp[i] = p[i];
    return load_bf16(tmp);
  }
  // One interleaved bfloat16 panel row (see bf16_panel_slot): columns 0-7 are the low halves of
  // the 32-bit words, 8-15 the high halves.
  static void load_bf16_panel(const uint16_t* row, Vec* out) {
    const uint32x4_t a = vld1q_u32(reinterpret_cast<const uint32_t*>(row));
    const uint32x4_t b = vld1q_u32(reinterpret_cast<const uint32_t*>(row) + 4);
    const uint32x4_t high = vdupq_n_u32(0xFFFF0000u);
    out[0] = {vreinterpretq_f32_u32(vshlq_n_u32(a, 16)), vreinterpretq_f32_u32(vshlq_n_u32(b, 16))};
    out[1] = {vreinterpretq_f32_u32(vandq_u32(a, high)), vreinterpretq_f32_u32(vandq_u32(b, high))};
  }
  // 8 int8 (half an int8 panel row) as floats.
  static Vec load_i8(const int8_t* p) {
    const int16x8_t w = vmovl_s8(vld1_s8(p));
    return {vcvtq_f32_s32(vmovl_s16(vget_low_s16(w))), vcvtq_f32_s32(vmovl_s16(vget_high_s16(w)))};
  }
  void store(float* p) const { vst1q_f32(p, lo), vst1q_f32(p + 4, hi); }
  void store_partial(float* p, int n) const {
    float tmp[W];
    store(tmp);
    for (int i = 0; i < n; ++i) p[i] = tmp[i];
  }

  friend Vec operator+(Vec a, Vec b) { return {vaddq_f32(a.lo, b.lo), vaddq_f32(a.hi, b.hi)}; }
  friend Vec operator-(Vec a, Vec b) { return {vsubq_f32(a.lo, b.lo), vsubq_f32(a.hi, b.hi)}; }
  friend Vec operator*(Vec a, Vec b) { return {vmulq_f32(a.lo, b.lo), vmulq_f32(a.hi, b.hi)}; }
  friend Vec operator/(Vec a, Vec b) { return {vdivq_f32(a.lo, b.lo), vdivq_f32(a.hi, b.hi)}; }
  // a * b + c, one rounding (FMLA).
  static Vec fma(Vec a, Vec b, Vec c) { return {vfmaq_f32(c.lo, a.lo, b.lo), vfmaq_f32(c.hi, a.hi, b.hi)}; }
  static Vec sqrt(Vec a) { return {vsqrtq_f32(a.lo), vsqrtq_f32(a.hi)}; }
  // a > b ? a : b, as x86's MAXPS (and the generic variant): b when either is NaN. NEON's FMAX
  // would return NaN there instead.
  static Vec max(Vec a, Vec b) {
    return {vbslq_f32(vcgtq_f32(a.lo, b.lo), a.lo, b.lo), vbslq_f32(vcgtq_f32(a.hi, b.hi), a.hi, b.hi)};
  }
  static Vec min(Vec a, Vec b) {
    return {vbslq_f32(vcltq_f32(a.lo, b.lo), a.lo, b.lo), vbslq_f32(vcltq_f32(a.hi, b.hi), a.hi, b.hi)};
  }
  // Lanes i < n keep a, the others become b.
  static Vec select_first(int n, Vec a, Vec b) {
    static const int32_t lanes[W] = {0, 1, 2, 3, 4, 5, 6, 7};
    const int32x4_t count = vdupq_n_s32(n);
    return {vbslq_f32(vcltq_s32(vld1q_s32(lanes), count), a.lo, b.lo),
            vbslq_f32(vcltq_s32(vld1q_s32(lanes + 4), count), a.hi, b.hi)};
  }
  // 2^n for integer-valued n in [-126, 127], built in the exponent field.
  static Vec pow2i(Vec n) {
    auto one = [](float32x4_t x) {
      const int32x4_t e = vaddq_s32(vcvtnq_s32_f32(x), vdupq_n_s32(127));
      return vreinterpretq_f32_s32(vshlq_n_s32(e, 23));
    };
    return {one(n.lo), one(n.hi)};
  }
  // Round to nearest, ties to even (as _MM_FROUND_TO_NEAREST_INT and nearbyint).
  static Vec round(Vec a) { return {vrndnq_f32(a.lo), vrndnq_f32(a.hi)}; }

  // The pairwise tree the other variants use: lane i + lane i+4, then (0+2) + (1+3).
  float reduce_add() const {
    const float32x4_t s4 = vaddq_f32(lo, hi);
    const float32x2_t s2 = vadd_f32(vget_low_f32(s4), vget_high_f32(s4));
    return vget_lane_f32(s2, 0) + vget_lane_f32(s2, 1);
  }
  // Whether any lane is above x or NaN (unordered): when not, max(x, reduce_max()) is x exactly.
  bool any_above(float x) const {
    const float32x4_t xs = vdupq_n_f32(x);
    return vminvq_u32(vandq_u32(vcleq_f32(lo, xs), vcleq_f32(hi, xs))) == 0;
  }
  float reduce_max() const {
    float tmp[W];
    store(tmp);
    float m = tmp[0];
    for (int i = 1; i < W; ++i) m = tmp[i] > m ? tmp[i] : m;
    return m;
  }
};

// Transposes the 4x4 block held in r0..r3 in place (row i becomes column i).
inline void transpose4(float32x4_t& r0, float32x4_t& r1, float32x4_t& r2, float32x4_t& r3) {
  const float32x4_t t0 = vtrn1q_f32(r0, r1), t1 = vtrn2q_f32(r0, r1);
  const float32x4_t t2 = vtrn1q_f32(r2, r3), t3 = vtrn2q_f32(r2, r3);
  r0 = vreinterpretq_f32_f64(vtrn1q_f64(vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t2)));
  r1 = vreinterpretq_f32_f64(vtrn1q_f64(vreinterpretq_f64_f32(t1), vreinterpretq_f64_f32(t3)));
  r2 = vreinterpretq_f32_f64(vtrn2q_f64(vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t2)));
  r3 = vreinterpretq_f32_f64(vtrn2q_f64(vreinterpretq_f64_f32(t1), vreinterpretq_f64_f32(t3)));
}

// Transposes an 8x8 block held in 8 Vecs (row i of the input becomes Vec i's lanes of column i):
// four 4x4 transposes, the two off-diagonal blocks swapping places.
inline void transpose_square(Vec* r) {
  transpose4(r[0].lo, r[1].lo, r[2].lo, r[3].lo);
  transpose4(r[4].hi, r[5].hi, r[6].hi, r[7].hi);
  transpose4(r[0].hi, r[1].hi, r[2].hi, r[3].hi);  // rows 0-3, columns 4-7
  transpose4(r[4].lo, r[5].lo, r[6].lo, r[7].lo);  // rows 4-7, columns 0-3
  for (int i = 0; i < 4; ++i) {
    const float32x4_t upper_right = r[i].hi;
    r[i].hi = r[i + 4].lo;
    r[i + 4].lo = upper_right;
  }
}

// MR: 4 rows x 2 Vecs = 16 accumulator registers, beside 4 of B and 4 of broadcast A. With 6 rows
// (AVX2's MR) GCC 12 kept each row's A value in a register of its own (by-element FMLA), 34
// registers of 32, and spilled the accumulators on every k step (objdump; no AArch64 machine
// was at hand to time either choice).
constexpr int kGemmRows = 4;
#define LLAMAS_TILE_EDGES_INLINE 1  // see gemm_tile_impl.h
constexpr const char* kVariantName = "neon";

}  // namespace
