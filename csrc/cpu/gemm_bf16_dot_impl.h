#pragma once
// GEMM with bfloat16 activations over bfloat16 weight panels, or int8 ones whose weights q * scale
// are rounded to bfloat16 first (GemmArgs::a_bf16: a model loaded with compute_dtype="bfloat16").
// A's values are rounded to bfloat16 (nearest, ties to even) and each C
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

namespace {

// Tile of the blocked path: rows x panels of 16 columns (24 accumulators on AVX-512; the FMA
// form on 8-lane registers needs two per panel and both k rows of B: 4 x 1 there).
constexpr int kDotRows = Vec::W == 16 ? 12 : 4;
constexpr int kDotPanels = Vec::W == 16 ? 2 : 1;
constexpr int kDotPerPanel = int(kPanelWidth / Vec::W);  // registers per panel row

#if defined(__AVX512BW__)
// x rounded to bfloat16 as llamas::float_to_bf16 does (nearest, ties to even; a NaN stays a quiet
// NaN instead of rounding up to infinity): the bits in the low half of each 32-bit lane.
inline __m512i bf16_bits(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x), high = _mm512_srli_epi32(bits, 16);
  const __m512i rounding = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(high, _mm512_set1_epi32(1)));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, rounding), 16);
  return _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), high, _mm512_set1_epi32(0x40));
}
#endif

// Rows [m0, m1) of A rounded to bfloat16, row r at dst + r * pairs: word p holds k = 2p in its low
// half and 2p + 1 in its high half (an odd K's last high half is 0).
inline void round_rows_to_pairs(const GemmArgs& g, int64_t m0, int64_t m1, uint32_t* dst, int64_t pairs) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* src = g.A + m * g.lda;
    uint16_t* out = reinterpret_cast<uint16_t*>(dst + (m - m0) * pairs);
    int64_t k = 0;
#if defined(__AVX512BW__)
    // 16 at a time (the scalar loop took ~1 ns an element: ~7% of a bfloat16 prefill).
    for (; k + 16 <= g.K; k += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), _mm512_cvtepi32_epi16(bf16_bits(_mm512_loadu_ps(src + k))));
#endif
    for (; k < g.K; ++k) out[k] = llamas::float_to_bf16(src[k]);
    if (g.K % 2) out[g.K] = 0;
  }
}

// int8 weights under bfloat16 compute: each weight is its float32 value q * scale (as the float32
// GEMM forms it) rounded to bfloat16. Rows [k0, k1) of the n panels from panel0 (clamped to the
// last, as panel_run does) become bfloat16 panel rows at dst ([panel][k1 - k0][16], interleaved as
// stored bfloat16 panels are: bf16_panel_slot), rows past K zero; the tiles then read them as
// they read bfloat16 weights. One weight costs a load, two conversions, a multiply and the
// rounding here, once per B block (prefill) or per 64-row chunk of a tile (decode).
inline void i8_rows_as_bf16(const GemmArgs& g, int64_t panel0, int64_t n, int64_t k0, int64_t k1, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t col = (panel0 + i) * kPanelWidth;
    const int8_t* q = panel_run<int8_t>(g, col, 0);
    const float* scales = i8_run_scales(g, col);
    uint16_t* out = dst + i * (k1 - k0) * kPanelWidth;
    for (int64_t k = k0; k < k1; ++k, out += kPanelWidth) {
      if (k >= g.K) {
        std::memset(out, 0, kPanelWidth * sizeof(uint16_t));
        continue;
      }
      const float* s = scales + k / llamas::kI8Block * kPanelWidth;
#if defined(__AVX512BW__)
      const __m512 w = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k * kPanelWidth)))),
          _mm512_loadu_ps(s));
      const __m512i r = bf16_bits(w);  // lane c: column c; slot 2 (c % 8) + c / 8 = 32-bit word c % 8, half c / 8
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                          _mm256_or_si256(_mm512_castsi512_si256(r), _mm256_slli_epi32(_mm512_extracti64x4_epi64(r, 1), 16)));
#else
      for (int c = 0; c < kPanelWidth; ++c)
        out[llamas::bf16_panel_slot(c)] = llamas::float_to_bf16(float(q[k * kPanelWidth + c]) * s[c]);
#endif
    }
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

// The same for VCVTNE2PS2BF16's output: row k's 16 columns in words 0-15, row k + 1's in 16-31.
inline __m512i dequantized_pairs_index() {
  alignas(64) uint16_t idx[32];
  for (int c = 0; c < 16; ++c) idx[2 * c] = uint16_t(c), idx[2 * c + 1] = uint16_t(16 + c);
  return _mm512_load_si512(idx);
}
#endif

// One R x (P panels) tile of C over k pairs [p0, p1). Ap: A's panel from pair p0, [pair][R] words;
// B[j]: bfloat16 panel j's row 2 p0 (row 2 p0 + r at + r * 16). kHw: VDPBF16PS, else two FMAs a pair.
// BT int8_t (VDPBF16PS only: decode over int8 panels): B[j] is int8 panel j's row 2 p0 and
// b_scales[j] its scales (i8_run_scales); each pair's two rows are dequantized, rounded to bfloat16
// (VCVTNE2PS2BF16: the same values i8_rows_as_bf16 makes, denormal products aside) and interleaved
// in registers, ~9 instructions a pair and panel against ~30 through i8_rows_as_bf16's rows.
// (Not inlined: see dot_blocked.)
// kAheadRows > 0: each panel's line kAheadRows k rows ahead is asked for at every pair (decode:
// see panels_ahead_rows).
template <int R, int P, bool kHw, typename BT = uint16_t, int kAheadRows = 0>
__attribute__((noinline)) void dot_tile(const GemmArgs& g, int64_t p0, int64_t p1, const uint32_t* Ap,
                                        const BT* const (&B)[P], float* C, int rows, int cols, int64_t col0,
                                        bool first, bool last, const float* const* b_scales = nullptr,
                                        const NextTileLines<P>* next = nullptr) {
  constexpr int kRegs = P * kDotPerPanel;
  Vec acc[R][kRegs];
  int lanes[kRegs];
  start_tile(g, acc, lanes, C, rows, cols, col0, first);
#if defined(__AVX512BF16__)
  const __m512i pair_index = kHw ? (std::is_same_v<BT, int8_t> ? dequantized_pairs_index() : panel_pairs_index())
                                 : _mm512_setzero_si512();
#endif
  typename NextTileLines<P>::Cursor fetch(next);
  // Pair p; `tail`: an odd K's last pair, whose row k + 1 does not exist (its A half is 0).
  auto pair_step = [&](int64_t p, auto tail) __attribute__((always_inline)) {
    fetch.fetch();  // one line (a pair of rows) of the next tile a pair
    if constexpr (kAheadRows > 0)
      for (int j = 0; j < P; ++j) __builtin_prefetch(B[j] + (2 * (p - p0) + kAheadRows) * kPanelWidth);
    const uint32_t* a = Ap + (p - p0) * R;
#if defined(__AVX512BF16__)
    if constexpr (kHw) {
      __m512i b[P];
      for (int j = 0; j < P; ++j) {
        if constexpr (std::is_same_v<BT, int8_t>) {
          const int8_t* two_rows = B[j] + 2 * (p - p0) * kPanelWidth;
          const __m256i q = tail ? _mm256_maskz_loadu_epi8(0xFFFF, two_rows)
                                 : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(two_rows));
          const __m512 scale = _mm512_loadu_ps(b_scales[j] + 2 * p / llamas::kI8Block * kPanelWidth);
          const __m512 even = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), scale);
          const __m512 odd = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))), scale);
          b[j] = _mm512_permutexvar_epi16(pair_index, (__m512i)_mm512_cvtne2ps_pbh(odd, even));
        } else {
          const uint16_t* row = B[j] + 2 * (p - p0) * kPanelWidth;
          b[j] = _mm512_permutexvar_epi16(pair_index, tail ? _mm512_maskz_loadu_epi16(0xFFFF, row) : _mm512_loadu_si512(row));
        }
      }
      for (int i = 0; i < R; ++i) {
        const __m512bh ai = (__m512bh)_mm512_set1_epi32(int(a[i]));
        for (int j = 0; j < P; ++j) acc[i][j].v = _mm512_dpbf16_ps(acc[i][j].v, ai, (__m512bh)b[j]);
      }
      return;
    }
#endif
    if constexpr (!std::is_same_v<BT, int8_t>) {  // (int8 tiles run only with kHw)
      Vec odd[kRegs], even[kRegs];
      for (int j = 0; j < P; ++j) {
        const uint16_t* row = B[j] + 2 * (p - p0) * kPanelWidth;
        if (tail) for (int r = 0; r < kDotPerPanel; ++r) odd[j * kDotPerPanel + r] = Vec::zero();
        else Vec::load_bf16_panel(row + kPanelWidth, odd + j * kDotPerPanel);
        Vec::load_bf16_panel(row, even + j * kDotPerPanel);
      }
      for (int i = 0; i < R; ++i) {
        const Vec a_odd = Vec::set1(llamas::bf16_to_float(uint16_t(a[i] >> 16)));
        const Vec a_even = Vec::set1(llamas::bf16_to_float(uint16_t(a[i])));
        for (int j = 0; j < kRegs; ++j) acc[i][j] = Vec::fma(a_even, even[j], Vec::fma(a_odd, odd[j], acc[i][j]));
      }
    }
  };
  const int64_t full_end = imin(p1, g.K / 2);
  // Rolled under clang: unrolled 4x, clang 14 hoisted the A broadcasts of the 4 steps into
  // registers and spilled or rotated accumulators (70 stack moves a loop in the 12 x 2 tile;
  // rolled, 24 VDPBF16PS in 44 instructions, none on the stack): 256-row bfloat16 compute
  // 242 -> 309-386 GFLOP/s.
#ifdef __clang__
#pragma clang loop unroll(disable)
#else
#pragma GCC unroll 4
#endif
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
// for few rows keep 8-16 chains and 4-8 panels' loads in flight, as panels_small_m. int8 weights
// (BT) dequantize in registers with VDPBF16PS (dot_tile), else run each tile in chunks of
// kI8ChunkPairs pairs converted first (P x 2 KiB, in L1).
constexpr int64_t kI8ChunkPairs = 32;
template <int R, bool kHw, typename BT>
void dot_small_m(const GemmArgs& g) {
  if constexpr (R > 1) {
    if (g.M < R) return dot_small_m<R - 1, kHw, BT>(g);
  }
  constexpr int P = Vec::W == 16 ? (R == 1 ? 8 : R == 2 ? 6 : R <= 4 ? 4 : 2) : (R <= 2 ? 2 : 1);
  constexpr bool kInt8 = std::is_same_v<BT, int8_t>;
  constexpr int kAhead = panels_ahead_rows<R, false>();
  const int64_t pairs = (g.K + 1) / 2;
  llamas::parallel_for(g.N, P * kPanelWidth, [&](int64_t n0, int64_t n1) {
    // (One row is its own panel: no rows to round first.)
    ScratchBuffer rows(R == 1 ? 0 : static_cast<size_t>(R * pairs + 1)), panel(static_cast<size_t>(R * pairs + 1));
    ScratchBuffer converted(kInt8 && !kHw ? size_t(P * 2 * kI8ChunkPairs * kPanelWidth / 2) : 0);
    uint32_t* rows_data = reinterpret_cast<uint32_t*>(rows.data);
    uint32_t* a = reinterpret_cast<uint32_t*>(panel.data);
    if (R == 1) round_rows_to_pairs(g, 0, 1, a, pairs);  // one row is its own panel
    else pack_pairs_panel<R>(g, 0, rows_data, a);
    for (int64_t col = n0; col < n1; col += P * kPanelWidth) {
      const uint16_t* B[P];
      const int cols = int(imin(P * kPanelWidth, n1 - col));
      if constexpr (kInt8 && kHw) {
        const int8_t* Bq[P];
        const float* scales[P];
        for (int j = 0; j < P; ++j)
          Bq[j] = panel_run<int8_t>(g, col + j * kPanelWidth, 0), scales[j] = i8_run_scales(g, col + j * kPanelWidth);
        dot_tile<R, P, kHw, int8_t, kAhead>(g, 0, pairs, a, Bq, g.C + col, int(g.M), cols, col, true, true, scales);
      } else if constexpr (kInt8) {
        uint16_t* chunk = reinterpret_cast<uint16_t*>(converted.data);
        for (int j = 0; j < P; ++j) B[j] = chunk + j * 2 * kI8ChunkPairs * kPanelWidth;
        for (int64_t c0 = 0; c0 < pairs || (c0 == 0 && pairs == 0); c0 += kI8ChunkPairs) {
          const int64_t c1 = imin(pairs, c0 + kI8ChunkPairs);
          i8_rows_as_bf16(g, col / kPanelWidth, P, 2 * c0, 2 * c0 + 2 * kI8ChunkPairs, chunk);
          dot_tile<R, P, kHw>(g, c0, c1, a + c0 * R, B, g.C + col, int(g.M), cols, col, c0 == 0, c1 >= pairs);
          if (pairs == 0) break;
        }
      } else {
        for (int j = 0; j < P; ++j) B[j] = panel_run<uint16_t>(g, col + j * kPanelWidth, 0);
        dot_tile<R, P, kHw, uint16_t, kAhead>(g, 0, pairs, a, B, g.C + col, int(g.M), cols, col, true, true);
      }
    }
  });
}

// More rows (prefill, batched decode with a prompt): BLIS-style blocking as packed_columns (kNC
// columns, kKC / 2 pairs, kMC rows), B read in place from its panels (a 128-pair strip of two
// panels is 16 KiB, in L1 under the row panels); int8 panels are converted a block at a time
// (256 rows x up to 512 columns, 256 KiB, in L2) for all the row panels to share. The threads of
// the one region first round and lay out A's panels, each claiming the next; a last panel of 1-4
// or 5-8 rows gets a 4- or 8-row tile, so a batch of 16 pads 4 rows instead of 8.
template <bool kHw, typename BT, int R = kDotRows>
void dot_blocked(const GemmArgs& g) {
  constexpr bool kInt8 = std::is_same_v<BT, int8_t>;
  constexpr int P = kDotPanels;
  static_assert(kMC % R == 0, "row blocks hold whole row panels");
  const int64_t pairs = (g.K + 1) / 2, panels = (g.M + R - 1) / R;
  ScratchBuffer Ap(static_cast<size_t>(panels * R * pairs + 1));
  uint32_t* a_panels = reinterpret_cast<uint32_t*>(Ap.data);
  SharedPanelPack packing;
  llamas::parallel_for(g.N, P * kPanelWidth, [&](int64_t n0, int64_t n1) {
    {
      ScratchBuffer rows(static_cast<size_t>(R * pairs + 1));
      uint32_t* rows_data = reinterpret_cast<uint32_t*>(rows.data);
      packing.run(panels, [&](int64_t p) {
        uint32_t* dst = a_panels + p * R * pairs;
        with_tile_rows<R>(tile_rows_for<R>(g.M - p * R),
                          [&](auto rows) { pack_pairs_panel<decltype(rows)::value>(g, p * R, rows_data, dst); });
      });
    }
    ScratchBuffer converted(kInt8 ? size_t(kKC * kNC / 2) : 0);
    uint16_t* block = reinterpret_cast<uint16_t*>(converted.data);
    for (int64_t jc = n0; jc < n1; jc += kNC) {
      const int64_t nc = imin(kNC, n1 - jc);
      for (int64_t pc = 0; pc < pairs || (pc == 0 && pairs == 0); pc += kKC / 2) {
        const int64_t pe = imin(pairs, pc + kKC / 2);
        if constexpr (kInt8) i8_rows_as_bf16(g, jc / kPanelWidth, (nc + kPanelWidth - 1) / kPanelWidth, 2 * pc, 2 * pe, block);
        for (int64_t ic = 0; ic < g.M; ic += kMC)
          for (int64_t jr = 0; jr < nc; jr += P * kPanelWidth) {
            const uint16_t* B[P];
            for (int j = 0; j < P; ++j) {
              if constexpr (kInt8) {  // the converted block's panel (one past its last is never stored)
                const int64_t in_block = imin((jr + j * kPanelWidth) / kPanelWidth, (nc - 1) / kPanelWidth);
                B[j] = block + in_block * 2 * (pe - pc) * kPanelWidth;
              } else {
                B[j] = panel_run<uint16_t>(g, jc + jr + j * kPanelWidth, 2 * pc);
              }
            }
            const int cols = int(imin(P * kPanelWidth, nc - jr));
            // A batched decode step's few row tiles share the fetching of the next column tile's
            // rows of this pass (bfloat16 panels read in place; int8 ones are converted a block at a
            // time first, into L2). 16-row products cycling through 64 weight matrices (out of L2),
            // builds alternated: 16 x 256 x 1024 35-48 -> 27 us a call (25-26 with the weights in
            // L2), 16 x 256 x 4096 121-141 -> 91; the bundled model's 16-sequence step (bfloat16
            // weights and compute) GEMM 27.7 -> 24.6 us a call. dot_tile is not inlined here: inlined
            // into this loop with the fetching, it ran at half speed.
            NextTileLines<P> next;
            const int64_t row_tiles = (imin(g.M, ic + kMC) - ic + R - 1) / R;
            const bool fetch_next = kHw && !kInt8 && g.M <= kBatchedDecodeRows && jr + P * kPanelWidth < nc;
            if (fetch_next) {
              for (int j = 0; j < P; ++j)
                next.panels[j] = reinterpret_cast<const char*>(panel_run<uint16_t>(g, jc + jr + (P + j) * kPanelWidth, 2 * pc));
              next.lines_per_panel = pe - pc;
            }
            for (int64_t ir = ic; ir < imin(g.M, ic + kMC); ir += R) {
              if (fetch_next) next.share((ir - ic) / R, row_tiles);
              const NextTileLines<P>* n = fetch_next ? &next : nullptr;
              const int rows = int(imin(R, g.M - ir)), tile = tile_rows_for<R>(rows);
              const uint32_t* a = a_panels + ir * pairs + pc * tile;
              float* c = g.C + ir * g.ldc + jc + jr;
              const bool first = pc == 0, last = pe >= pairs;
              with_tile_rows<R>(tile, [&](auto t) {
                dot_tile<decltype(t)::value, P, kHw>(g, pc, pe, a, B, c, rows, cols, jc + jr, first, last, nullptr, n);
              });
            }
          }
        if (pairs == 0) break;
      }
    }
  }, 2);
}

// Up to 48 rows (a server's batched decode step) in 8-row tiles (a last of 4): 16 rows as 8 + 8
// instead of 12 + 4. Bundled-model shapes, 500 warm calls, builds alternated 4 times (GFLOP/s):
// 16 x 1024 x 256 271-276 -> 295-303; 16 x 256 x 1024, 16 x 256 x 4096 and 24 x 768 x 2304 level.
template <bool kHw, typename BT>
void gemm_bf16_dot_as(const GemmArgs& g) {
  if (g.M <= kDotRows) dot_small_m<kDotRows, kHw, BT>(g);
  else if (Vec::W == 16 && g.M <= kBatchedDecodeRows) dot_blocked<kHw, BT, 8>(g);
  else dot_blocked<kHw, BT>(g);
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
  if (hardware) return g.b_i8 ? gemm_bf16_dot_as<true, int8_t>(g) : gemm_bf16_dot_as<true, uint16_t>(g);
#endif
  (void)hardware;
  if (g.b_i8) gemm_bf16_dot_as<false, int8_t>(g);
  else gemm_bf16_dot_as<false, uint16_t>(g);
}

}  // namespace
