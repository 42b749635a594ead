#pragma once
// GEMM, written once against Vec. Every path computes each C element as one FMA chain over k
// ascending, started from the bias, 0 or C, so all are bit-identical:
//  - B as stored, (K, N) or (N, K):
//    - small M (1..kSmallM rows): stream B once, rows of C stay in L1; bandwidth-bound.
//    - packed (prefill, training): BLIS-style blocking. A is packed into kGemmRows-row panels, B
//      into KC x NC blocks of NR = 2W-column panels; a kGemmRows x NR register tile accumulates
//      over KC.
//  - B in panels (BLayout::Panels, loaded models' weights): the packed path reads the panels in
//    place, and up to kFewRowPanels row panels (decode, batched decode) run over all of K per tile.
#include <cstring>
#include <type_traits>

#include "llamas/allocator.h"
#include "llamas/parallel.h"

namespace {

using llamas::BLayout;
using llamas::GemmArgs;
using llamas::kPanelWidth;

constexpr int kNR = 2 * Vec::W;    // columns per register tile
static_assert(kPanelWidth % Vec::W == 0, "a register's columns must lie in one stored panel");
constexpr int64_t kKC = 256;       // packed B micro-panel: 256 x 2W floats = 16 KiB (AVX2), in L1
constexpr int64_t kMC = 120;       // packed A block: 120 x 256 floats = 120 KiB, in L2
constexpr int64_t kNC = 512;       // packed B block: 256 x 512 floats = 512 KiB, in L2/L3
constexpr int64_t kSmallM = 8;     // at or below this many rows, stream B instead of packing it

struct ScratchBuffer {
  float* data = nullptr;
  explicit ScratchBuffer(size_t floats) {
    if (floats > 0) data = static_cast<float*>(llamas::cpu_allocate(floats * 4));
  }
  ~ScratchBuffer() {
    if (data) llamas::cpu_free(data);
  }
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
};

// Masked loads and stores are slow on AMD (VMASKMOVPS stores are microcoded): use them only for
// the ragged edge of C, never for full registers.
inline Vec load_lanes(const float* p, int lanes) {
  return lanes == Vec::W ? Vec::load(p) : Vec::load_partial(p, lanes);
}
inline void store_lanes(float* p, Vec v, int lanes) {
  if (lanes == Vec::W) v.store(p);
  else if (lanes > 0) v.store_partial(p, lanes);
}

// C[m, n0:n1] = bias or 0 before the FMA chains start (not with accumulate).
inline void init_rows(const GemmArgs& g, int64_t n0, int64_t n1) {
  if (g.accumulate) return;
  for (int64_t m = 0; m < g.M; ++m) {
    float* c = g.C + m * g.ldc;
    if (g.bias) std::memcpy(c + n0, g.bias + n0, (n1 - n0) * sizeof(float));
    else std::memset(c + n0, 0, (n1 - n0) * sizeof(float));
  }
}

inline void gelu_rows(const GemmArgs& g, int64_t n0, int64_t n1) {
  if (!g.gelu) return;
  for (int64_t m = 0; m < g.M; ++m) {
    float* c = g.C + m * g.ldc;
    int64_t n = n0;
    for (; n + Vec::W <= n1; n += Vec::W) vgelu(Vec::load(c + n)).store(c + n);
    if (n < n1) vgelu(Vec::load_partial(c + n, int(n1 - n))).store_partial(c + n, int(n1 - n));
  }
}

// ---- small M, B stored (K, N): C[m, n] = fma chain over 8 rows of B at a time ------------------
template <typename BT>
void small_m_kn(const GemmArgs& g, int64_t n0, int64_t n1) {
  // kRows rows of B per pass: 8 concurrent row streams per thread keep enough cache-line misses
  // in flight when each thread's row segment is short (768 columns / 2 threads = 1.5 KiB).
  constexpr int kRows = 8;
  const BT* B = static_cast<const BT*>(g.B);
  init_rows(g, n0, n1);
  for (int64_t k = 0; k < g.K; k += kRows) {
    int kk = int(imin(kRows, g.K - k));
    const BT* b0 = B + k * g.ldb;
    for (int64_t m = 0; m < g.M; ++m) {
      const float* a = g.A + m * g.lda + k;
      float* c = g.C + m * g.ldc;
      Vec as[kRows];
      for (int i = 0; i < kRows; ++i) as[i] = Vec::set1(i < kk ? a[i] : 0.f);
      int64_t n = n0;
      if (kk == kRows) {
        for (; n + Vec::W <= n1; n += Vec::W) {
          Vec acc = Vec::load(c + n);
          for (int i = 0; i < kRows; ++i) acc = Vec::fma(as[i], load_any(b0 + i * g.ldb + n), acc);
          acc.store(c + n);
        }
      }
      // Column tail, and the last k < kRows rows: same chain order, one row at a time.
      for (; n < n1; n += Vec::W) {
        int lanes = clamp_lanes(n1 - n);
        Vec acc = Vec::load_partial(c + n, lanes);
        for (int i = 0; i < kk; ++i) acc = Vec::fma(as[i], load_any_partial(b0 + i * g.ldb + n, lanes), acc);
        acc.store_partial(c + n, lanes);
      }
    }
  }
  gelu_rows(g, n0, n1);
}

// ---- small M, B stored (N, K): W x W blocks of B are transposed in registers -------------------
// NB blocks of W columns x MR rows of C stay in registers over all of K: each C element is still
// one FMA chain over k ascending, and NB * MR independent chains hide the FMA latency. One row
// (decode) uses NB = 2, i.e. 16 row streams of B: one thread, 1 x 768 x 50257, streamed 12.5 GB/s
// from DRAM (CPU time) against 9.5 with one block (latency-bound chain) and 5.5 with four (32
// streams outrun the hardware prefetcher; software prefetch made it worse).
template <typename BT, int NB, int MR>
void small_m_nk_tile(const GemmArgs& g, int64_t n, int64_t m0, const int (&rows)[NB]) {
  const BT* B = static_cast<const BT*>(g.B);
  Vec acc[NB][MR];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < MR; ++r) acc[b][r] = load_lanes(g.C + (m0 + r) * g.ldc + n + b * Vec::W, rows[b]);
  for (int64_t k = 0; k < g.K; k += Vec::W) {
    const int kk = clamp_lanes(g.K - k);
    for (int b = 0; b < NB; ++b) {
      Vec t[Vec::W];
      for (int i = 0; i < Vec::W; ++i) {
        const BT* src = B + (n + b * Vec::W + i) * g.ldb + k;
        t[i] = i >= rows[b] ? Vec::zero() : (kk == Vec::W ? load_any(src) : load_any_partial(src, kk));
      }
      transpose_square(t);  // t[j] = B[n + b*W .. + W, k + j]
      for (int j = 0; j < kk; ++j)
        for (int r = 0; r < MR; ++r) acc[b][r] = Vec::fma(Vec::set1(g.A[(m0 + r) * g.lda + k + j]), t[j], acc[b][r]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < MR; ++r) store_lanes(g.C + (m0 + r) * g.ldc + n + b * Vec::W, acc[b][r], rows[b]);
}

template <typename BT, int NB, int MR>
void small_m_nk_rows(const GemmArgs& g, int64_t m0, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NB * Vec::W <= n1; n += NB * Vec::W) {
    int rows[NB];
    for (int b = 0; b < NB; ++b) rows[b] = Vec::W;
    small_m_nk_tile<BT, NB, MR>(g, n, m0, rows);
  }
  for (; n < n1; n += Vec::W) {
    const int rows[1] = {clamp_lanes(n1 - n)};
    small_m_nk_tile<BT, 1, MR>(g, n, m0, rows);
  }
}

template <typename BT>
void small_m_nk(const GemmArgs& g, int64_t n0, int64_t n1) {
  init_rows(g, n0, n1);
  // Register budget (16 on AVX2): NB * MR accumulators + W transposed rows + a broadcast.
  for (int64_t m = 0; m < g.M;) {
    const int64_t left = g.M - m;
    if (left >= 4) small_m_nk_rows<BT, 1, 4>(g, m, n0, n1), m += 4;
    else if (left == 3) small_m_nk_rows<BT, 2, 3>(g, m, n0, n1), m += 3;
    else if (left == 2) small_m_nk_rows<BT, 2, 2>(g, m, n0, n1), m += 2;
    else small_m_nk_rows<BT, 2, 1>(g, m, n0, n1), m += 1;
  }
  gelu_rows(g, n0, n1);
}

// ---- packed path ---------------------------------------------------------------------------------
// One A panel: rows [row0, row0+R) and k in [pc, pc+kc), stored [k][R], zero-padded past M.
template <int R = kGemmRows>
inline void pack_a_panel(const GemmArgs& g, int64_t row0, int64_t pc, int64_t kc, float* dst) {
  const int rows = int(imin(R, g.M - row0));
  for (int64_t k = 0; k < kc; ++k) {
    float* d = dst + k * R;
    if (g.a_trans) {  // A^T stored (K, M): each k is a contiguous run of the panel's rows
      const float* src = g.A + (pc + k) * g.lda + row0;
      for (int i = 0; i < rows; ++i) d[i] = src[i];
    } else {
      for (int i = 0; i < rows; ++i) d[i] = g.A[(row0 + i) * g.lda + pc + k];
    }
    for (int i = rows; i < R; ++i) d[i] = 0.f;
  }
}

// All of A, panel p at Ap + p * MR * K (so k block pc of it starts at + pc * MR).
void pack_a(const GemmArgs& g, float* Ap) {
  int64_t panels = (g.M + kGemmRows - 1) / kGemmRows;
  llamas::parallel_for(panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) pack_a_panel(g, p * kGemmRows, 0, g.K, Ap + p * kGemmRows * g.K);
  });
}

// W columns of the stored panels at column col (a multiple of W) and row k. A run past the last
// panel (the second half of a 32-column AVX-512 tile over an odd panel count) reads the last
// panel instead: those lanes are never stored. bfloat16 rows are interleaved (bf16_panel_slot), so
// for them this is the row of col's whole panel, read with load_bf16_panel.
template <typename BT>
inline const BT* panel_run(const GemmArgs& g, int64_t col, int64_t k) {
  const int64_t p = imin(col / kPanelWidth, (g.N - 1) / kPanelWidth);
  const BT* row = static_cast<const BT*>(g.B) + (p * g.K + k) * kPanelWidth;
  if constexpr (std::is_same_v<BT, uint16_t>) return row;
  else return row + col % kPanelWidth;
}

// The RUNS registers of B at k step k: W columns per run pointer, or for bfloat16 panels one
// whole interleaved panel row per kPanelWidth / W runs (tiles then start on panel boundaries).
template <typename BT, int RUNS>
inline void load_b_runs(const BT* const (&B)[RUNS], int64_t offset, Vec (&b)[RUNS]) {
  if constexpr (std::is_same_v<BT, uint16_t>) {
    constexpr int kPerPanel = int(kPanelWidth / Vec::W);
    static_assert(RUNS % kPerPanel == 0, "bfloat16 panel tiles cover whole panels");
    for (int j = 0; j < RUNS; j += kPerPanel) Vec::load_bf16_panel(B[j] + offset, b + j);
  } else {
    for (int j = 0; j < RUNS; ++j) b[j] = load_any(B[j] + offset);
  }
}

// Packs B[pc:pc+kc, jc:jc+nc] as panels of kNR columns, [panel][k][kNR], zero-padded past nc.
template <typename BT>
void pack_b(const GemmArgs& g, int64_t pc, int64_t kc, int64_t jc, int64_t nc, float* Bp) {
  const BT* B = static_cast<const BT*>(g.B);
  if constexpr (std::is_same_v<BT, uint16_t>) {
    if (g.b_layout == BLayout::Panels) {
      // Stored bfloat16 panels (float32 ones are read in place) are already runs of 16 columns;
      // this only widens them, a whole panel row at a time (jc is a multiple of kNR).
      constexpr int kPerPanel = int(kPanelWidth / Vec::W);
      for (int64_t j = 0; j < (nc + kNR - 1) / kNR * kNR; j += kPanelWidth) {
        const BT* src = panel_run<BT>(g, jc + j, pc);
        for (int64_t k = 0; k < kc; ++k) {
          Vec row[kPerPanel];
          Vec::load_bf16_panel(src + k * kPanelWidth, row);
          for (int i = 0; i < kPerPanel; ++i) {
            const int64_t col = j + i * Vec::W;
            row[i].store(Bp + (col / kNR) * kc * kNR + col % kNR + k * kNR);
          }
        }
      }
      return;
    }
  }
  if (g.b_layout == BLayout::KN) {
    // Eight rows at a time, panel by panel: each panel gets 8 x 64 contiguous bytes, each source
    // row 64. Walking down a whole column panel touches a new page per row (ldb = 9 KiB at
    // N = 2304); writing one row across all panels hits 32 streams 16 KiB apart that alias in L1.
    // Either took 12% of a 256x768x2304 product.
    const int64_t padded = (nc + kNR - 1) / kNR * kNR;  // the last panel is zero-filled
    for (int64_t k0 = 0; k0 < kc; k0 += 8) {
      const int64_t k1 = imin(kc, k0 + 8);
      for (int64_t j = 0; j < padded; j += Vec::W) {
        const int cols = clamp_lanes(nc - j);  // 0 past nc
        float* dst = Bp + (j / kNR) * kc * kNR + j % kNR;
        for (int64_t k = k0; k < k1; ++k) {
          const BT* src = B + (pc + k) * g.ldb + jc + j;
          Vec v = cols == Vec::W ? load_any(src) : cols > 0 ? load_any_partial(src, cols) : Vec::zero();
          v.store(dst + k * kNR);
        }
      }
    }
    return;
  }
  // B stored (N, K): W x W blocks transposed in registers.
  for (int64_t jr = 0; jr < nc; jr += kNR) {
    float* panel = Bp + (jr / kNR) * kc * kNR;
    for (int half = 0; half < 2; ++half) {
      int64_t col = jc + jr + half * Vec::W;
      int cols = clamp_lanes(jc + nc - col);
      for (int64_t k = 0; k < kc; k += Vec::W) {
        int kk = clamp_lanes(kc - k);
        Vec t[Vec::W];
        for (int i = 0; i < Vec::W; ++i) {
          const BT* src = B + (col + i) * g.ldb + pc + k;
          t[i] = i >= cols ? Vec::zero() : (kk == Vec::W ? load_any(src) : load_any_partial(src, kk));
        }
        transpose_square(t);
        for (int j = 0; j < kk; ++j) t[j].store(panel + (k + j) * kNR + half * Vec::W);
      }
    }
  }
}

// One R x (RUNS * W) tile of C over kc steps of k: A is a packed panel [k][R]; B is RUNS runs of W
// columns with k stride ldbk (a packed block: Bp + j * W, kNR; Panels: columns of the stored
// panels, 16). The main tile is 2 runs; decode's 1-2 rows take 4 so that 4-8 FMA chains overlap.
// kStreamB (a batched decode step: B streams from memory once, then serves several row panels from
// L1): the caller passes the next tile's runs as `next`, and the first row panel's pass asks for
// one of their k rows per k step, so the next tile's B (16-64 KiB) arrives while this tile's
// other row panels run. (Prefetching the current runs 4 KiB ahead, as before, left the product
// at ~8 GB/s from DRAM: 63-89 GFLOP/s against 99-117 with B in cache.) Not for one or two rows:
// there the hardware prefetcher keeps up, and the extra instructions cost GPT-2 124M's batch-1
// decode 12%.
template <typename BT, int R = kGemmRows, int RUNS = 2, bool kStreamB = false>
void micro_tile(const GemmArgs& g, int64_t kc, const float* Ap, const BT* const (&B)[RUNS], int64_t ldbk, float* C,
                int rows, int cols, int64_t col0, bool first, bool last, const BT* const* next = nullptr) {
  Vec acc[R][RUNS];
  int lanes[RUNS];
  for (int j = 0; j < RUNS; ++j) lanes[j] = clamp_lanes(cols - j * Vec::W);
  if (first && !g.accumulate) {
    for (int j = 0; j < RUNS; ++j) {
      Vec start = g.bias ? load_lanes(g.bias + col0 + j * Vec::W, lanes[j]) : Vec::zero();
      for (int i = 0; i < R; ++i) acc[i][j] = start;
    }
  } else {
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < RUNS; ++j) acc[i][j] = i < rows ? load_lanes(C + i * g.ldc + j * Vec::W, lanes[j]) : Vec::zero();
  }
  // Four k steps per loop iteration: the pointer and counter updates of a rolled loop (~5 scalar
  // instructions per 12 FMAs) cost the 6x16 tile ~10% (75 -> 83 GFLOP/s, one core, L1/L2 data).
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    if constexpr (kStreamB)
      if (next)
        for (int j = 0; j < RUNS; j += kPanelWidth / Vec::W) __builtin_prefetch(next[j] + k * ldbk);
    Vec b[RUNS];
    load_b_runs<BT, RUNS>(B, k * ldbk, b);
    const float* a = Ap + k * R;
    for (int i = 0; i < R; ++i) {
      Vec ai = Vec::set1(a[i]);
      for (int j = 0; j < RUNS; ++j) acc[i][j] = Vec::fma(ai, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < RUNS; ++j) {
      Vec c = acc[i][j];
      if (last && g.gelu) c = vgelu(c);
      store_lanes(C + i * g.ldc + j * Vec::W, c, lanes[j]);
    }
}

// Tiles of one B block (kc x nc at column jc) against rows [m0, m1) of A. a_panel(ir) gives A's
// packed panel at k offset 0 of this block, b_run(j) the W columns at jc + j of B (k stride ldbk).
template <typename BT, typename APanel, typename BRun>
inline void block_tiles(const GemmArgs& g, int64_t kc, int64_t jc, int64_t nc, int64_t m0, int64_t m1, bool first,
                        bool last, int64_t ldbk, APanel a_panel, BRun b_run) {
  for (int64_t jr = 0; jr < nc; jr += kNR)
    for (int64_t ir = m0; ir < m1; ir += kGemmRows) {
      // The next tile's C rows (read at its start unless this is the first k block): fetched
      // during this tile's kc FMA steps instead of stalling the next one's accumulators.
      if (!first || g.accumulate)
        for (int64_t i = ir + kGemmRows; i < imin(m1, ir + 2 * kGemmRows); ++i)
          __builtin_prefetch(g.C + i * g.ldc + jc + jr), __builtin_prefetch(g.C + i * g.ldc + jc + jr + kNR - 1);
      const BT* runs[2] = {b_run(jr), b_run(jr + Vec::W)};
      micro_tile<BT>(g, kc, a_panel(ir), runs, ldbk, g.C + ir * g.ldc + jc + jr, int(imin(kGemmRows, g.M - ir)),
                     int(imin(kNR, nc - jr)), jc + jr, first, last);
    }
}

// W columns of a packed B block (kc x kNR panels) starting at block column j.
inline const float* packed_run(const float* Bp, int64_t kc, int64_t j) {
  return Bp + (j / kNR) * kc * kNR + j % kNR;
}

// Columns [n0, n1) of C against all of A, packed beforehand (Ap). Float32 panels are read in
// place (a kc x 16 run of a panel stays in L1 under the row panels); any other B is packed (or,
// for bfloat16 panels, widened) block by block first: widening inside the microkernel costs two
// more instructions per B load and, with 12 accumulators, spills a register.
template <typename BT>
void packed_columns(const GemmArgs& g, const float* Ap, int64_t n0, int64_t n1) {
  bool in_place = false;
  if constexpr (std::is_same_v<BT, float>) in_place = g.b_layout == BLayout::Panels;
  ScratchBuffer Bp(in_place ? 0 : static_cast<size_t>(kKC * kNC));
  for (int64_t jc = n0; jc < n1; jc += kNC) {
    int64_t nc = imin(kNC, n1 - jc);
    for (int64_t pc = 0; pc < g.K || (pc == 0 && g.K == 0); pc += kKC) {
      int64_t kc = imin(kKC, g.K - pc);
      auto a_panel = [&](int64_t ir) { return Ap + (ir / kGemmRows) * kGemmRows * g.K + pc * kGemmRows; };
      if (in_place) {
        for (int64_t ic = 0; ic < g.M; ic += kMC)
          block_tiles<float>(g, kc, jc, nc, ic, imin(g.M, ic + kMC), pc == 0, pc + kc >= g.K, kPanelWidth, a_panel,
                             [&](int64_t j) { return panel_run<float>(g, jc + j, pc); });
      } else {
        pack_b<BT>(g, pc, kc, jc, nc, Bp.data);
        for (int64_t ic = 0; ic < g.M; ic += kMC)
          block_tiles<float>(g, kc, jc, nc, ic, imin(g.M, ic + kMC), pc == 0, pc + kc >= g.K, kNR, a_panel,
                             [&](int64_t j) { return packed_run(Bp.data, kc, j); });
      }
      if (g.K == 0) break;
    }
  }
}

// Rows [m0, m1) of C against all of B: this range packs its own A blocks (kMC x kKC) and its own
// copy of each B block, so tall products (weight gradients: M = 768..50257 rows against N = 768)
// read A once instead of once per column range.
template <typename BT>
void packed_rows(const GemmArgs& g, int64_t m0, int64_t m1) {
  ScratchBuffer Bp(static_cast<size_t>(kKC * kNC));
  ScratchBuffer Ablock(static_cast<size_t>(kMC * kKC));
  for (int64_t jc = 0; jc < g.N; jc += kNC) {
    int64_t nc = imin(kNC, g.N - jc);
    for (int64_t pc = 0; pc < g.K || (pc == 0 && g.K == 0); pc += kKC) {
      int64_t kc = imin(kKC, g.K - pc);
      pack_b<BT>(g, pc, kc, jc, nc, Bp.data);
      for (int64_t ic = m0; ic < m1; ic += kMC) {
        int64_t mc = imin(kMC, m1 - ic);
        for (int64_t ir = ic; ir < ic + mc; ir += kGemmRows)
          pack_a_panel(g, ir, pc, kc, Ablock.data + (ir - ic) / kGemmRows * kGemmRows * kc);
        block_tiles<float>(g, kc, jc, nc, ic, ic + mc, pc == 0, pc + kc >= g.K, kNR,
                           [&](int64_t ir) { return Ablock.data + (ir - ic) / kGemmRows * kGemmRows * kc; },
                           [&](int64_t j) { return packed_run(Bp.data, kc, j); });
      }
      if (g.K == 0) break;
    }
  }
}

// ---- Panels: B stored in the GEMM's own layout (ops::pack_panels) ----------------------------
// Up to kGemmRows rows (decode, small batches): R = M rows exactly, so no FMA is spent on padding,
// and each thread streams its columns' panels front to back, over all of K at once.
template <typename BT, int R>
void panels_small_m(const GemmArgs& g) {
  if constexpr (R > 1) {
    if (g.M < R) return panels_small_m<BT, R - 1>(g);
  }
  ScratchBuffer Ap(static_cast<size_t>(R * (g.K > 0 ? g.K : 1)));
  pack_a_panel<R>(g, 0, 0, g.K, Ap.data);
  // One or two rows: tiles of 4 runs, so 4-8 independent FMA chains hide the FMA latency (2 chains
  // would cap a thread at 64 bytes of B per 4 cycles, below what L3 delivers for small models).
  constexpr int kRuns = R <= 2 ? 4 : 2;
  llamas::parallel_for(g.N, kRuns * Vec::W, [&](int64_t n0, int64_t n1) {
    for (int64_t col = n0; col < n1; col += kRuns * Vec::W) {
      const BT* runs[kRuns];
      for (int j = 0; j < kRuns; ++j) runs[j] = panel_run<BT>(g, col + j * Vec::W, 0);
      micro_tile<BT, R, kRuns>(g, g.K, Ap.data, runs, kPanelWidth, g.C + col, R, int(imin(kRuns * Vec::W, n1 - col)),
                               col, true, true);
    }
  });
}

// A few register tiles of rows (a server's batched decode step: 7..24 sequences): A packed here in
// one pass, then each thread walks its columns' panels once, running every row panel over all of
// K per tile. The blocked path's parallel packing of A and its k/row blocking cost more than the
// product itself at these sizes (16 x 256 x 256 is 2 MFLOP: ~12 us on 2 cores).
constexpr int64_t kFewRowPanels = 4;

template <typename BT, int R, int RUNS>
void panels_few_rows_tiled(const GemmArgs& g) {
  const int64_t panels = (g.M + R - 1) / R;
  ScratchBuffer Ap(static_cast<size_t>(panels * R * (g.K > 0 ? g.K : 1)));
  for (int64_t p = 0; p < panels; ++p) pack_a_panel<R>(g, p * R, 0, g.K, Ap.data + p * R * g.K);
  // 4 ranges per thread: these products are compute-bound, and a server's event loop shares the
  // cores, so a thread it preempts mid-product hands its remaining ranges to the other.
  constexpr int64_t kCols = RUNS * Vec::W;
  llamas::parallel_for(g.N, kCols, [&](int64_t n0, int64_t n1) {
    const BT* runs[RUNS];
    const BT* next[RUNS];
    for (int j = 0; j < RUNS; ++j) next[j] = panel_run<BT>(g, n0 + j * Vec::W, 0);
    for (int64_t col = n0; col < n1; col += kCols) {
      for (int j = 0; j < RUNS; ++j) runs[j] = next[j], next[j] = panel_run<BT>(g, col + kCols + j * Vec::W, 0);
      const bool more = col + kCols < n1;
      for (int64_t p = 0; p < panels; ++p)
        micro_tile<BT, R, RUNS, true>(g, g.K, Ap.data + p * R * g.K, runs, kPanelWidth, g.C + p * R * g.ldc + col,
                                      int(imin(R, g.M - p * R)), int(imin(kCols, n1 - col)), col, true, true,
                                      p == 0 && more ? next : nullptr);
    }
  }, 4);
}

template <typename BT>
void panels_few_rows(const GemmArgs& g) {
  // With 8-lane registers, 4-row x 3-register tiles when they pad fewer rows than 6 x 2 (16
  // sequences: 16 rows instead of 18), also one B load fewer per 12 FMAs (7 against 8).
  // (24-column tiles straddle panels: float32 only, bfloat16 tiles load whole interleaved panels.)
  if constexpr (Vec::W == 8 && kGemmRows == 6 && std::is_same_v<BT, float>) {
    if ((g.M + 3) / 4 * 4 < (g.M + 5) / 6 * 6) return panels_few_rows_tiled<BT, 4, 3>(g);
  }
  panels_few_rows_tiled<BT, kGemmRows, 2>(g);
}

template <typename BT>
void gemm_typed(const GemmArgs& g) {
  if (g.b_layout == BLayout::Panels) {
    if (g.M <= kGemmRows) return panels_small_m<BT, kGemmRows>(g);
    if (g.M <= kFewRowPanels * kGemmRows) return panels_few_rows<BT>(g);
  } else if (g.M <= kSmallM && !g.a_trans) {
    // 64 columns = a whole number of cache lines per thread range.
    llamas::parallel_for(g.N, 64, [&](int64_t n0, int64_t n1) {
      if (g.b_layout == BLayout::KN) small_m_kn<BT>(g, n0, n1);
      else small_m_nk<BT>(g, n0, n1);
    });
    return;
  }
  // Split rows for tall products whose B is small (weight gradients: M = 768..50257 against
  // K = B*T tokens): one range per thread, each packing its own A blocks and its own copy of B, so
  // A is read once instead of once per column range. With a long K (dlnf: K = 50257) re-packing
  // all of B per range would cost more than sharing one packed A. (Weights in panels are never
  // tall: they meet activations, not activations' transposes.)
  if (g.b_layout != BLayout::Panels && g.M > g.N && g.M >= 2 * g.K) {
    const int64_t threads = llamas::num_threads();
    const int64_t blocks = (g.M + kMC - 1) / kMC;
    llamas::parallel_for(blocks, (blocks + threads - 1) / threads, [&](int64_t b0, int64_t b1) {
      packed_rows<BT>(g, b0 * kMC, imin(g.M, b1 * kMC));
    });
    return;
  }
  ScratchBuffer Ap(static_cast<size_t>((g.M + kGemmRows - 1) / kGemmRows * kGemmRows * (g.K > 0 ? g.K : 1)));
  pack_a(g, Ap.data);
  // 2 column ranges per thread: a thread the machine descheduled is caught up by the others,
  // while each range still reuses the packed A over a wide B block (every range reads all of A:
  // with 4 per thread, 256x3072x768 read its 3 MiB A eight times).
  llamas::parallel_for(g.N, kNR, [&](int64_t n0, int64_t n1) { packed_columns<BT>(g, Ap.data, n0, n1); }, 2);
}

void gemm(const GemmArgs& g) {
  if (g.M == 0 || g.N == 0) return;
  if (g.b_bf16) gemm_typed<uint16_t>(g);
  else gemm_typed<float>(g);
}

}  // namespace
