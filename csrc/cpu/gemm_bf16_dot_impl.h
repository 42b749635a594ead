#pragma once
// GEMM with bfloat16 activations over bfloat16 weight panels (GemmArgs::a_bf16: a model loaded with
// compute_dtype="bfloat16"). A's values are rounded to bfloat16 (nearest, ties to even) and each C
// element is one float32 chain over k pairs, ascending, from the bias (or C):
//     c = (c + a[2p+1] b[2p+1]) + a[2p] b[2p]
// which is what one lane of VDPBF16PS computes (the odd product first: checked against 10^6 random
// cases on Zen 4). A product of two bfloat16 is exact in float32, so each add rounds once and two
// FMAs reproduce the instruction bit for bit (denormal inputs aside: the instruction reads them as
// zero). With AVX512_BF16 one instruction does 32 multiply-adds where an FMA does 16, at the same
// issue rate (Zen 4, one core: 231 against 115 GFLOP/s), so a prefill's GEMMs can run twice as fast
// as with float32 activations; without it the same sums are formed with FMAs. Every path here (any
// M, the k blocking, any thread count) runs the one chain per element: batch-invariant, as
// gemm_impl.h's paths are. Part of gemm_impl.h.
#include "cpu/gemm_tile_impl.h"
#include "llamas/bfloat16.h"
#include "llamas/cpu_features.h"

#include <atomic>

namespace {

// Tile of the blocked path: rows x panels of 16 columns (24 accumulators on AVX-512; the FMA
// form on 8-lane registers needs two per panel and both k rows of B: 4 x 1 there).
constexpr int kDotRows = Vec::W == 16 ? 12 : 4;
constexpr int kDotPanels = Vec::W == 16 ? 2 : 1;
constexpr int kDotPerPanel = int(kPanelWidth / Vec::W);  // registers per panel row

// Rows [m0, m1) of A rounded to bfloat16, row r at dst + r * pairs: word p holds k = 2p in its low
// half and 2p + 1 in its high half (an odd K's last high half is 0).
inline void round_rows_to_pairs(const GemmArgs& g, int64_t m0, int64_t m1, uint32_t* dst, int64_t pairs) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* src = g.A + m * g.lda;
    uint16_t* out = reinterpret_cast<uint16_t*>(dst + (m - m0) * pairs);
    int64_t k = 0;
#if defined(__AVX512BW__)
    // 16 at a time (the scalar loop took ~1 ns an element: ~7% of a bfloat16 prefill).
    const __m512i half_ulp = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    for (; k + 16 <= g.K; k += 16) {
      const __m512 x = _mm512_loadu_ps(src + k);
      const __m512i bits = _mm512_castps_si512(x);
      const __m512i high = _mm512_srli_epi32(bits, 16);
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(half_ulp, _mm512_and_si512(high, one))), 16);
      // A NaN stays a quiet NaN (llamas::float_to_bf16) instead of rounding up to infinity.
      r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), high, _mm512_set1_epi32(0x40));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), _mm512_cvtepi32_epi16(r));
    }
#endif
    for (; k < g.K; ++k) out[k] = llamas::float_to_bf16(src[k]);
    if (g.K % 2) out[g.K] = 0;
  }
}

#if defined(__AVX512BF16__)
// The word permutation that turns rows k and k + 1 of an interleaved bfloat16 panel
// (bf16_panel_slot) into what VDPBF16PS wants: 32-bit lane c holds column c of row k (low half)
// and of row k + 1 (high half).
inline __m512i panel_pairs_index() {
  alignas(64) uint16_t idx[32];
  for (int c = 0; c < 16; ++c)
    idx[2 * c] = uint16_t(llamas::bf16_panel_slot(c)), idx[2 * c + 1] = uint16_t(16 + llamas::bf16_panel_slot(c));
  return _mm512_load_si512(idx);
}
#endif

// One R x (P panels) tile of C over k pairs [p0, p1). Ap: A's panel from pair p0, [pair][R] words;
// B[j]: panel j's row 0 (row k at + k * 16). kHw: VDPBF16PS, else two FMAs a pair.
template <int R, int P, bool kHw>
void dot_tile(const GemmArgs& g, int64_t p0, int64_t p1, const uint32_t* Ap, const uint16_t* const (&B)[P], float* C,
              int rows, int cols, int64_t col0, bool first, bool last) {
  constexpr int kRegs = P * kDotPerPanel;
  Vec acc[R][kRegs];
  int lanes[kRegs];
  start_tile(g, acc, lanes, C, rows, cols, col0, first);
#if defined(__AVX512BF16__)
  const __m512i pair_index = kHw ? panel_pairs_index() : _mm512_setzero_si512();
#endif
  // Pair p; `tail`: an odd K's last pair, whose row k + 1 does not exist (its A half is 0).
  auto pair_step = [&](int64_t p, auto tail) __attribute__((always_inline)) {
    const uint32_t* a = Ap + (p - p0) * R;
#if defined(__AVX512BF16__)
    if constexpr (kHw) {
      __m512i b[P];
      for (int j = 0; j < P; ++j) {
        const uint16_t* row = B[j] + 2 * p * kPanelWidth;
        b[j] = _mm512_permutexvar_epi16(pair_index, tail ? _mm512_maskz_loadu_epi16(0xFFFF, row) : _mm512_loadu_si512(row));
      }
      for (int i = 0; i < R; ++i) {
        const __m512bh ai = (__m512bh)_mm512_set1_epi32(int(a[i]));
        for (int j = 0; j < P; ++j) acc[i][j].v = _mm512_dpbf16_ps(acc[i][j].v, ai, (__m512bh)b[j]);
      }
      return;
    }
#endif
    Vec odd[kRegs], even[kRegs];
    for (int j = 0; j < P; ++j) {
      const uint16_t* row = B[j] + 2 * p * kPanelWidth;
      if (tail) for (int r = 0; r < kDotPerPanel; ++r) odd[j * kDotPerPanel + r] = Vec::zero();
      else Vec::load_bf16_panel(row + kPanelWidth, odd + j * kDotPerPanel);
      Vec::load_bf16_panel(row, even + j * kDotPerPanel);
    }
    for (int i = 0; i < R; ++i) {
      const Vec a_odd = Vec::set1(llamas::bf16_to_float(uint16_t(a[i] >> 16)));
      const Vec a_even = Vec::set1(llamas::bf16_to_float(uint16_t(a[i])));
      for (int j = 0; j < kRegs; ++j) acc[i][j] = Vec::fma(a_even, even[j], Vec::fma(a_odd, odd[j], acc[i][j]));
    }
  };
  const int64_t full_end = imin(p1, g.K / 2);
#pragma GCC unroll 4
  for (int64_t p = p0; p < full_end; ++p) pair_step(p, std::false_type{});
  if (p1 > full_end) pair_step(full_end, std::true_type{});
  finish_tile(g, acc, lanes, C, rows, last);
}

// A panel of R rows from row0: rounded into `pairs_rows` (R x pairs words of scratch), then laid out
// [pair][R] at dst (zero-padded past M).
template <int R>
inline void pack_pairs_panel(const GemmArgs& g, int64_t row0, uint32_t* pairs_rows, uint32_t* dst) {
  const int64_t pairs = (g.K + 1) / 2, rows = imin(R, g.M - row0);
  round_rows_to_pairs(g, row0, row0 + rows, pairs_rows, pairs);
  GemmArgs rounded;  // the rounded rows as pack_a_panel's A (it moves 32-bit words)
  rounded.M = rows, rounded.K = pairs, rounded.lda = pairs;
  rounded.A = reinterpret_cast<const float*>(pairs_rows);
  pack_a_panel<R>(rounded, 0, 0, pairs, reinterpret_cast<float*>(dst));
}

// Up to kDotRows rows (decode, small batches): R = M, every thread rounds the few rows itself (no
// wait on another thread) and streams its one range of columns' panels over all of K. Wide tiles
// for few rows keep 8-16 chains and 4-8 panels' loads in flight, as panels_small_m.
template <int R, bool kHw>
void dot_small_m(const GemmArgs& g) {
  if constexpr (R > 1) {
    if (g.M < R) return dot_small_m<R - 1, kHw>(g);
  }
  constexpr int P = Vec::W == 16 ? (R == 1 ? 8 : R == 2 ? 6 : R <= 4 ? 4 : 2) : (R <= 2 ? 2 : 1);
  const int64_t pairs = (g.K + 1) / 2;
  llamas::parallel_for(g.N, P * kPanelWidth, [&](int64_t n0, int64_t n1) {
    ScratchBuffer rows(static_cast<size_t>(R * pairs + 1)), panel(static_cast<size_t>(R * pairs + 1));
    uint32_t* rows_data = reinterpret_cast<uint32_t*>(rows.data);
    uint32_t* a = reinterpret_cast<uint32_t*>(panel.data);
    if (R == 1) round_rows_to_pairs(g, 0, 1, a, pairs);  // one row is its own panel
    else pack_pairs_panel<R>(g, 0, rows_data, a);
    for (int64_t col = n0; col < n1; col += P * kPanelWidth) {
      const uint16_t* B[P];
      for (int j = 0; j < P; ++j) B[j] = panel_run<uint16_t>(g, col + j * kPanelWidth, 0);
      dot_tile<R, P, kHw>(g, 0, pairs, a, B, g.C + col, int(g.M), int(imin(P * kPanelWidth, n1 - col)), col, true, true);
    }
  });
}

// More rows (prefill, batched decode with a prompt): BLIS-style blocking as packed_columns (kNC
// columns, kKC / 2 pairs, kMC rows), B read in place from its panels (a 128-pair strip of two
// panels is 16 KiB, in L1 under the row panels). The threads of the one region first round and
// lay out A's panels, each claiming the next; a last panel of 1-4 or 5-8 rows gets a 4- or 8-row
// tile, so a batch of 16 pads 4 rows instead of 8.
template <bool kHw>
void dot_blocked(const GemmArgs& g) {
  constexpr int R = kDotRows, P = kDotPanels;
  const int64_t pairs = (g.K + 1) / 2, panels = (g.M + R - 1) / R, left = g.M % R;
  const int r_last = left == 0 ? R : left <= 4 ? 4 : left <= 8 ? 8 : R;
  ScratchBuffer Ap(static_cast<size_t>(panels * R * pairs + 1));
  uint32_t* a_panels = reinterpret_cast<uint32_t*>(Ap.data);
  std::atomic<int64_t> next_panel{0}, packed{0};
  llamas::parallel_for(g.N, P * kPanelWidth, [&](int64_t n0, int64_t n1) {
    {
      ScratchBuffer rows(static_cast<size_t>(R * pairs + 1));
      uint32_t* rows_data = reinterpret_cast<uint32_t*>(rows.data);
      for (int64_t p; (p = next_panel.fetch_add(1, std::memory_order_relaxed)) < panels;) {
        uint32_t* dst = a_panels + p * R * pairs;
        if (p < panels - 1 || r_last == R) pack_pairs_panel<R>(g, p * R, rows_data, dst);
        else if (r_last == 8) pack_pairs_panel<8>(g, p * R, rows_data, dst);
        else pack_pairs_panel<4>(g, p * R, rows_data, dst);
        packed.fetch_add(1, std::memory_order_release);
      }
    }
    for (int spin = 0; packed.load(std::memory_order_acquire) < panels; ++spin) llamas::spin_pause(spin);
    for (int64_t jc = n0; jc < n1; jc += kNC) {
      const int64_t nc = imin(kNC, n1 - jc);
      for (int64_t pc = 0; pc < pairs || (pc == 0 && pairs == 0); pc += kKC / 2) {
        const int64_t pe = imin(pairs, pc + kKC / 2);
        for (int64_t ic = 0; ic < g.M; ic += kMC)
          for (int64_t jr = 0; jr < nc; jr += P * kPanelWidth) {
            const uint16_t* B[P];
            for (int j = 0; j < P; ++j) B[j] = panel_run<uint16_t>(g, jc + jr + j * kPanelWidth, 0);
            const int cols = int(imin(P * kPanelWidth, nc - jr));
            for (int64_t ir = ic; ir < imin(g.M, ic + kMC); ir += R) {
              const uint32_t* a = a_panels + ir * pairs + pc * (ir / R == panels - 1 ? r_last : R);
              float* c = g.C + ir * g.ldc + jc + jr;
              const int rows = int(imin(R, g.M - ir));
              const bool first = pc == 0, last = pe >= pairs;
              if (ir / R < panels - 1 || r_last == R)
                dot_tile<R, P, kHw>(g, pc, pe, a, B, c, rows, cols, jc + jr, first, last);
              else if (r_last == 8)
                dot_tile<8, P, kHw>(g, pc, pe, a, B, c, rows, cols, jc + jr, first, last);
              else
                dot_tile<4, P, kHw>(g, pc, pe, a, B, c, rows, cols, jc + jr, first, last);
            }
          }
        if (pairs == 0) break;
      }
    }
  }, 2);
}

template <bool kHw>
void gemm_bf16_dot_as(const GemmArgs& g) {
  if (g.M <= kDotRows) dot_small_m<kDotRows, kHw>(g);
  else dot_blocked<kHw>(g);
}

bool bf16_dot_native() {
#if defined(__AVX512BF16__)
  return llamas::cpu_features().avx512_bf16;
#else
  return false;
#endif
}

void gemm_bf16_dot(const GemmArgs& g, bool hardware) {
#if defined(__AVX512BF16__)
  if (hardware) return gemm_bf16_dot_as<true>(g);
#endif
  (void)hardware;
  gemm_bf16_dot_as<false>(g);
}

}  // namespace
