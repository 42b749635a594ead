#pragma once
// GEMM with int8 activations over int8 weight panels (GemmArgs::a_i8: a model loaded with
// dtype="int8", compute_dtype="int8"; W8A8, as llama.cpp's Q8_0 x Q8_0 dot products). Each row of
// A is quantized per 32-k block the way the weights are (llamas::quantize_int8: scale = max |a| /
// 127, q = a / scale to nearest), and each C element is one float32 chain over the blocks,
// ascending, from the bias (or C):
//     c = fma(float(sum over the block's k of qa * qw), sa * sw, c)
// The block's integer dot is exact (|dot| <= 32 x 127^2 < 2^24, so its float is too), so every
// path, variant and thread count gives the same bits, and a row's result does not depend on the
// other rows (batch-invariant). With AVX512_VNNI one VPDPBUSD does 64 multiply-adds where
// VDPBF16PS does 32 and an FMA 16; elsewhere VPMADDWD over pairs of k (AVX2) or plain integer
// loops (generic) form the same dots.
// VPDPBUSD multiplies unsigned by signed bytes: the weights are made unsigned by flipping their
// sign bit (w + 128), and each block's dot starts from -128 x (the block's sum of qa), which the
// quantizer keeps beside the scale. Part of gemm_impl.h.
#include <cmath>

#include "cpu/gemm_tile_impl.h"
#include "llamas/cpu_features.h"
#include "llamas/int8.h"

#if defined(__AVX512BW__) && defined(LLAMAS_AVX512_VNNI_TARGET)
// Only these functions may use VNNI: the rest of the avx512 variant also runs on AVX-512 CPUs
// without it (Skylake-X), so the flag is not the file's.
#define LLAMAS_I8_DOT_HW 1
#define LLAMAS_VNNI_FN __attribute__((target("avx512vnni")))
#else
#define LLAMAS_I8_DOT_HW 0
#endif

namespace {

using llamas::kI8Block;

// A's rows quantized: row m's q at q + m * stride (stride = blocks * 32, zero past K), and its
// blocks' scales and -128 x (sum of q) at scale / offset + m * blocks.
struct I8Rows {
  int64_t blocks = 0, stride = 0;
  int8_t* q = nullptr;
  float* scale = nullptr;
  int32_t* offset = nullptr;
};

// Scratch for M quantized rows, laid out as I8Rows.
struct I8RowsBuffer {
  I8Rows rows;
  ScratchBuffer buffer;
  I8RowsBuffer(int64_t M, int64_t K)
      : buffer(size_t(M * ((K + kI8Block - 1) / kI8Block) * (kI8Block / 4 + 2) + 1)) {
    rows.blocks = (K + kI8Block - 1) / kI8Block, rows.stride = rows.blocks * kI8Block;
    rows.scale = buffer.data;
    rows.offset = reinterpret_cast<int32_t*>(buffer.data + M * rows.blocks);
    rows.q = reinterpret_cast<int8_t*>(buffer.data + 2 * M * rows.blocks);
  }
};

// Rows [m0, m1) of A into `out` (its row indices are A's).
inline void quantize_rows(const GemmArgs& g, int64_t m0, int64_t m1, const I8Rows& out) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = g.A + m * g.lda;
    int8_t* q = out.q + m * out.stride;
    for (int64_t b = 0; b < out.blocks; ++b) {
      const int64_t k0 = b * kI8Block, n = imin(kI8Block, g.K - k0);
      float scale;
      int32_t sum = 0;
#if defined(__AVX512BW__)
      // quantize_int8's arithmetic, 16 lanes at a time.
      {
        const __mmask16 m_lo = Vec::tail_mask(int(imin(16, n))), m_hi = Vec::tail_mask(int(n > 16 ? n - 16 : 0));
        const __m512 lo = _mm512_maskz_loadu_ps(m_lo, x + k0), hi = _mm512_maskz_loadu_ps(m_hi, x + k0 + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        if (_mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q)) amax = NAN;
        const llamas::Int8Scale s = llamas::int8_scale(amax);
        scale = s.scale;
        const __m512 inverse = _mm512_set1_ps(s.inverse);
        auto to_q = [&](__m512 v) {
          __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(v, inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r, r, _CMP_ORD_Q), r);  // NaN (inf x 0) -> 0
          return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f)));
        };
        const __m512i q_lo = to_q(lo), q_hi = to_q(hi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k0), _mm512_cvtepi32_epi8(q_lo));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k0 + 16), _mm512_cvtepi32_epi8(q_hi));
        sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q_lo, q_hi));
      }
#else
      scale = llamas::quantize_int8(x + k0, n, 1, q + k0, 1);
      for (int64_t k = n; k < kI8Block; ++k) q[k0 + k] = 0;
      for (int64_t k = 0; k < kI8Block; ++k) sum += q[k0 + k];
#endif
      out.scale[m * out.blocks + b] = scale;
      out.offset[m * out.blocks + b] = -128 * sum;
    }
  }
}

// Exactly fused a * b + c in every lane: Vec::fma where the variant has FMA (the generic variant's
// Vec::fma is a multiply and an add on CPUs without one).
inline Vec fused_fma(Vec a, Vec b, Vec c) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return Vec::fma(a, b, c);
#else
  alignas(64) float x[Vec::W], y[Vec::W], z[Vec::W];
  a.store(x), b.store(y), c.store(z);
  for (int l = 0; l < Vec::W; ++l) z[l] = std::fma(x[l], y[l], z[l]);
  return Vec::load(z);
#endif
}

// The integer dots of one block, k in [k0, k_end), of R quantized rows (row pointers qa) against P
// panels (B[j]: q rows as stored): dot[i][16 j + c] for panel j's column c.
template <int R, int P>
inline void block_dots(const int8_t* const (&qa)[R], int64_t k0, int64_t k_end, const int8_t* const (&B)[P],
                       int32_t (&dot)[R][P * kPanelWidth]) {
#if defined(__AVX2__)
  // VPMADDWD over pairs of k: a panel's rows k and k + 1 interleaved and widened to int16, each
  // 32-bit lane of A the pair (a[k], a[k + 1]); products and pair sums are exact in int32. An odd
  // block end reads one row past it (the next block's, or the scales after K) against a[k + 1] = 0
  // (rows are zero to their stride). AVX2, 2 threads, 256 x 768 x 2304: 134 GFLOP/s, against 11.6
  // with the plain loops below (float32 compute: ~190).
  __m256i acc[R][2 * P];
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < 2 * P; ++r) acc[i][r] = _mm256_setzero_si256();
  for (int64_t k = k0; k < k_end; k += 2) {  // (an odd count's last pair reads a[k + 1] = 0)
    __m256i w[2 * P];
    for (int j = 0; j < P; ++j) {
      const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(B[j] + k * kPanelWidth));
      const __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(B[j] + (k + 1) * kPanelWidth));
      w[2 * j] = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(r0, r1));      // columns 0-7
      w[2 * j + 1] = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(r0, r1));  // columns 8-15
    }
    for (int i = 0; i < R; ++i) {
      const uint32_t pair = uint32_t(uint16_t(int16_t(qa[i][k]))) | uint32_t(uint16_t(int16_t(qa[i][k + 1]))) << 16;
      const __m256i ai = _mm256_set1_epi32(int32_t(pair));
      for (int r = 0; r < 2 * P; ++r) acc[i][r] = _mm256_add_epi32(acc[i][r], _mm256_madd_epi16(w[r], ai));
    }
  }
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < 2 * P; ++r) _mm256_storeu_si256(reinterpret_cast<__m256i*>(&dot[i][8 * r]), acc[i][r]);
#else
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < P * kPanelWidth; ++c) dot[i][c] = 0;
  for (int64_t k = k0; k < k_end; ++k)
    for (int i = 0; i < R; ++i) {
      const int32_t ai = qa[i][k];
      for (int j = 0; j < P; ++j)
        for (int c = 0; c < kPanelWidth; ++c) dot[i][j * kPanelWidth + c] += ai * B[j][k * kPanelWidth + c];
    }
#endif
}

// One R x (P panels) tile of C over blocks [b0, b1): rows row0.. of the quantized A (rows past M
// read row M - 1; they are never stored), B[j] / S[j] panel j's q rows and scales (panel_run,
// i8_run_scales). Without VNNI (any variant).
template <int R, int P>
void i8_tile(const GemmArgs& g, const I8Rows& a, int64_t row0, int64_t b0, int64_t b1, const int8_t* const (&B)[P],
             const float* const (&S)[P], float* C, int rows, int cols, int64_t col0, bool first, bool last) {
  constexpr int kRegs = P * int(kPanelWidth / Vec::W);
  Vec acc[R][kRegs];
  int lanes[kRegs];
  start_tile(g, acc, lanes, C, rows, cols, col0, first);
  const int8_t* qa[R];
  int64_t row[R];
  for (int i = 0; i < R; ++i) row[i] = imin(row0 + i, g.M - 1), qa[i] = a.q + row[i] * a.stride;
  for (int64_t b = b0; b < b1; ++b) {
    alignas(64) int32_t dot[R][P * kPanelWidth];
    const int64_t k0 = b * kI8Block;
    block_dots<R, P>(qa, k0, imin(g.K, k0 + kI8Block), B, dot);
    for (int i = 0; i < R; ++i) {
      const Vec sa = Vec::set1(a.scale[row[i] * a.blocks + b]);
      for (int r = 0; r < kRegs; ++r) {
        alignas(64) float d[Vec::W];
        for (int l = 0; l < Vec::W; ++l) d[l] = float(dot[i][r * Vec::W + l]);
        const float* sw = S[r * Vec::W / kPanelWidth] + b * kPanelWidth + r * Vec::W % kPanelWidth;
        acc[i][r] = fused_fma(Vec::load(d), Vec::load(sw) * sa, acc[i][r]);
      }
    }
  }
  finish_tile(g, acc, lanes, C, rows, last);
}

// The next column tile's lines (NextTileLines) and its scales. Without them a 16-row product with
// its weights out of L2 (a server's batched decode step: the weights and the KV cache go round L3)
// took 9-12 us more a call at the bundled model's shapes; builds alternated 4 times, cycling
// through 64 matrices: 16 x 256 x 1024 24-33 -> 20-24 us (18-20 with the weights in L2),
// 16 x 256 x 4096 91-125 -> 66-78.
template <int P>
struct I8NextTile : NextTileLines<P> {
  const float* scales[P];
};

#if LLAMAS_I8_DOT_HW
// The byte permutation that turns 4 rows of a panel (64 bytes, [row][16 columns]) into VPDPBUSD's
// operand, 32-bit lane c holding column c of the 4 rows. kVbmi: one VPERMB (AVX512_VBMI); else two
// steps, dwords across lanes (lane L gets columns 4L..4L+3 of each row), then a 4 x 4 byte transpose
// in each lane, for Cascade Lake (VNNI without VBMI, common in clouds), which would otherwise take
// the VPMADDWD path at about a quarter of the speed. VPERMB was 4-5% faster on Zen 4 (one thread,
// 256-512 rows). It is written as inline asm: these functions' target stays VNNI alone, so the
// compiler cannot put VBMI instructions anywhere else in them.
template <bool kVbmi>
struct QuadTranspose {
  __m512i first, second;
  QuadTranspose() {
    alignas(64) int32_t d[16];
    alignas(64) uint8_t b[64];
    for (int c = 0; c < 64; ++c) b[c] = uint8_t(kVbmi ? 16 * (c % 4) + c / 4 : 4 * (c % 4) + (c % 16) / 4);
    for (int lane = 0; lane < 4; ++lane)
      for (int row = 0; row < 4; ++row) d[4 * lane + row] = 4 * row + lane;
    first = _mm512_load_si512(kVbmi ? static_cast<const void*>(b) : static_cast<const void*>(d));
    second = _mm512_load_si512(b);
  }
  // Forced inline: clang 14 called it out of line from the tiles' VNNI-target loops (the target
  // attributes differ), saving and restoring all the tile's accumulators around every call.
  __attribute__((always_inline)) __m512i operator()(__m512i rows) const {
    if constexpr (kVbmi) {
      __m512i out;
      asm("vpermb %1, %2, %0" : "=v"(out) : "v"(rows), "v"(first));
      return out;
    } else {
      return _mm512_shuffle_epi8(_mm512_permutexvar_epi32(first, rows), second);
    }
  }
};

// i8_tile with VPDPBUSD. A quad of k past K reads up to 3 rows past the panel's q rows (its scales:
// at least 64 bytes follow) against q = 0 in A.
// kAheadRows > 0: each panel's line kAheadRows k rows ahead is asked for at every quad (decode:
// see panels_ahead_rows).
template <int R, int P, bool kVbmi, int kAheadRows = 0>
LLAMAS_VNNI_FN void i8_tile_hw(const GemmArgs& g, const I8Rows& a, int64_t row0, int64_t b0, int64_t b1,
                               const int8_t* const (&B)[P], const float* const (&S)[P], float* C, int rows, int cols,
                               int64_t col0, bool first, bool last, const I8NextTile<P>* next = nullptr) {
  Vec acc[R][P];
  int lanes[P];
  start_tile(g, acc, lanes, C, rows, cols, col0, first);
  const int8_t* qa[R];
  const float* sa[R];
  const int32_t* offset[R];
  for (int i = 0; i < R; ++i) {
    const int64_t m = imin(row0 + i, g.M - 1);
    qa[i] = a.q + m * a.stride, sa[i] = a.scale + m * a.blocks, offset[i] = a.offset + m * a.blocks;
  }
  const QuadTranspose<kVbmi> quads_of;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const int64_t quads = (g.K + 3) / 4;
  __m512i dot[R][P];
  typename NextTileLines<P>::Cursor fetch(next);
  if (next && next->begin == 0)  // the next tile's scales of these blocks
    for (int j = 0; j < P; ++j)
      for (int64_t b = b0; b < b1; ++b) __builtin_prefetch(next->scales[j] + b * kPanelWidth);
  // Rows k..k+3 of the tile's panels against R broadcast quads of A.
  auto quad_step = [&](int64_t k) __attribute__((always_inline, target("avx512vnni"))) {
    fetch.fetch();  // one line of the next tile's q rows a quad
    if constexpr (kAheadRows > 0)
      for (int j = 0; j < P; ++j) __builtin_prefetch(B[j] + (k + kAheadRows) * kPanelWidth);
    __m512i w[P];
    for (int j = 0; j < P; ++j)
      w[j] = _mm512_xor_si512(quads_of(_mm512_loadu_si512(B[j] + k * kPanelWidth)), flip);
    for (int i = 0; i < R; ++i) {
      int32_t four;
      std::memcpy(&four, qa[i] + k, 4);
      const __m512i ai = _mm512_set1_epi32(four);
      for (int j = 0; j < P; ++j) dot[i][j] = _mm512_dpbusd_epi32(dot[i][j], w[j], ai);
    }
  };
  for (int64_t b = b0; b < b1; ++b) {
    for (int i = 0; i < R; ++i) {
      const __m512i start = _mm512_set1_epi32(offset[i][b]);
      for (int j = 0; j < P; ++j) dot[i][j] = start;
    }
    const int64_t k0 = b * kI8Block, k_end = 4 * imin(quads, (b + 1) * (kI8Block / 4));
    if (k_end - k0 == kI8Block) {
      // A whole block: a constant trip count. (Unrolling the variable-count loop below made GCC
      // rotate the accumulators through ~2 register moves per VPDPBUSD.)
      // clang keeps it rolled: unrolled, clang 14 hoisted several steps' loads into registers and
      // spilled accumulators (256-row int8 compute 263-370 GFLOP/s unrolled, 414-572 rolled).
#ifdef __clang__
#pragma clang loop unroll(disable)
#else
#pragma GCC unroll 8
#endif
      for (int t = 0; t < kI8Block / 4; ++t) quad_step(k0 + 4 * t);
    } else {
      for (int64_t k = k0; k < k_end; k += 4) quad_step(k);
    }
    for (int j = 0; j < P; ++j) {
      const __m512 sw = _mm512_loadu_ps(S[j] + b * kPanelWidth);
      for (int i = 0; i < R; ++i)
        acc[i][j].v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i][j]), _mm512_mul_ps(sw, _mm512_set1_ps(sa[i][b])),
                                      acc[i][j].v);
    }
  }
  finish_tile(g, acc, lanes, C, rows, last);
}
#endif

template <int R, int P, bool kHw, int kAheadRows = 0>
inline void i8_tile_as(const GemmArgs& g, const I8Rows& a, int64_t row0, int64_t b0, int64_t b1,
                       const int8_t* const (&B)[P], const float* const (&S)[P], float* C, int rows, int cols,
                       int64_t col0, bool first, bool last, const I8NextTile<P>* next = nullptr) {
#if LLAMAS_I8_DOT_HW
  if constexpr (kHw) {
    static const bool vbmi = llamas::cpu_features().avx512_vbmi;
    if (vbmi) return i8_tile_hw<R, P, true, kAheadRows>(g, a, row0, b0, b1, B, S, C, rows, cols, col0, first, last, next);
    return i8_tile_hw<R, P, false, kAheadRows>(g, a, row0, b0, b1, B, S, C, rows, cols, col0, first, last, next);
  }
#endif
  (void)next;
  i8_tile<R, P>(g, a, row0, b0, b1, B, S, C, rows, cols, col0, first, last);
}

// Panels col / 16 .. + P (clamped to the last, as panel_run does): their q rows and scales.
template <int P>
inline void i8_panels_at(const GemmArgs& g, int64_t col, const int8_t* (&B)[P], const float* (&S)[P]) {
  for (int j = 0; j < P; ++j) B[j] = panel_run<int8_t>(g, col + j * kPanelWidth, 0), S[j] = i8_run_scales(g, col + j * kPanelWidth);
}

// Up to kI8SmallRows rows (decode): R = M; every thread quantizes the few rows itself and streams
// its range of columns' panels over all of K.
constexpr int kI8SmallRows = 6;
template <int R, bool kHw>
void i8_small_m(const GemmArgs& g) {
  if constexpr (R > 1) {
    if (g.M < R) return i8_small_m<R - 1, kHw>(g);
  }
  constexpr int P = !kHw ? 1 : R <= 2 ? 4 : R <= 4 ? 3 : 2;
  constexpr int kAhead = panels_ahead_rows<R, false>();
  llamas::parallel_for(g.N, P * kPanelWidth, [&](int64_t n0, int64_t n1) {
    I8RowsBuffer quantized(g.M, g.K);
    quantize_rows(g, 0, g.M, quantized.rows);
    for (int64_t col = n0; col < n1; col += P * kPanelWidth) {
      const int8_t* B[P];
      const float* S[P];
      i8_panels_at(g, col, B, S);
      i8_tile_as<R, P, kHw, kAhead>(g, quantized.rows, 0, 0, quantized.rows.blocks, B, S, g.C + col, int(g.M),
                                    int(imin(P * kPanelWidth, n1 - col)), col, true, true);
    }
  });
}

// More rows (prefill, batched decode): the threads quantize A together (each claiming the next 8
// rows), then each column range runs blocks of 8 k-blocks (256 k: a 2-panel strip is 8 KiB, in L1
// under every row tile) over all rows, R-row tiles (a last of 2 or 4 rows when that is all left).
template <bool kHw>
void i8_blocked(const GemmArgs& g) {
  constexpr int R = kHw ? 6 : 4, P = kHw ? 2 : 1;
  constexpr int64_t kRowChunk = 8, kBlocksPerPass = kKC / kI8Block;
  I8RowsBuffer quantized(g.M, g.K);
  const I8Rows& a = quantized.rows;
  SharedPanelPack packing;
  llamas::parallel_for(g.N, P * kPanelWidth, [&](int64_t n0, int64_t n1) {
    packing.run((g.M + kRowChunk - 1) / kRowChunk,
                [&](int64_t c) { quantize_rows(g, c * kRowChunk, imin(g.M, (c + 1) * kRowChunk), a); });
    for (int64_t jc = n0; jc < n1; jc += kNC) {
      const int64_t nc = imin(kNC, n1 - jc);
      for (int64_t b0 = 0; b0 < a.blocks || (b0 == 0 && a.blocks == 0); b0 += kBlocksPerPass) {
        const int64_t b1 = imin(a.blocks, b0 + kBlocksPerPass);
        const bool first = b0 == 0, last = b1 >= a.blocks;
        for (int64_t jr = 0; jr < nc; jr += P * kPanelWidth) {
          const int8_t* B[P];
          const float* S[P];
          i8_panels_at(g, jc + jr, B, S);
          const int cols = int(imin(P * kPanelWidth, nc - jr));
          float* c = g.C + jc + jr;
          // A batched decode step's few row tiles share the fetching of the next column tile (the
          // VPDPBUSD tiles: the integer loops are not bound by their loads).
          const int64_t row_tiles = (g.M + R - 1) / R;
          I8NextTile<P> next;
          const bool fetch_next = kHw && g.M <= kBatchedDecodeRows && jr + P * kPanelWidth < nc;
          if (fetch_next) {
            const int8_t* rows0[P];
            i8_panels_at(g, jc + jr + P * kPanelWidth, rows0, next.scales);
            for (int j = 0; j < P; ++j) next.panels[j] = reinterpret_cast<const char*>(rows0[j] + b0 * kI8Block * kPanelWidth);
            next.lines_per_panel = (imin(g.K, b1 * kI8Block) - b0 * kI8Block + 3) / 4;
          }
          for (int64_t ir = 0; ir < g.M; ir += R) {
            const int rows = int(imin(R, g.M - ir));
            if (fetch_next) next.share(ir / R, row_tiles);
            const I8NextTile<P>* n = fetch_next ? &next : nullptr;
            float* c_rows = c + ir * g.ldc;
            if (rows > 4 || R <= 4) i8_tile_as<R, P, kHw>(g, a, ir, b0, b1, B, S, c_rows, rows, cols, jc + jr, first, last, n);
            else if (rows > 2) i8_tile_as<4, P, kHw>(g, a, ir, b0, b1, B, S, c_rows, rows, cols, jc + jr, first, last, n);
            else i8_tile_as<2, P, kHw>(g, a, ir, b0, b1, B, S, c_rows, rows, cols, jc + jr, first, last, n);
          }
        }
        if (a.blocks == 0) break;
      }
    }
  }, 2);
}

bool i8_dot_native() {
#if LLAMAS_I8_DOT_HW
  return llamas::cpu_features().avx512_vnni;
#else
  return false;
#endif
}

void gemm_i8_dot(const GemmArgs& g, bool hardware) {
#if LLAMAS_I8_DOT_HW
  if (hardware) return g.M <= kI8SmallRows ? i8_small_m<kI8SmallRows, true>(g) : i8_blocked<true>(g);
#endif
  (void)hardware;
  if (g.M <= kI8SmallRows) i8_small_m<kI8SmallRows, false>(g);
  else i8_blocked<false>(g);
}

}  // namespace
