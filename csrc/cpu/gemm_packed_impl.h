#pragma once
// The blocked GEMM (prefill, training): A packed into row panels, B packed block by block (or
// read in place when it is already in float32 panels), register tiles over KC. Part of
// gemm_impl.h.
#include "cpu/gemm_tile_impl.h"

namespace {

// ---- packed path ---------------------------------------------------------------------------------
// All of A, panel p at Ap + p * MR * K (so k block pc of it starts at + pc * MR).
void pack_a(const GemmArgs& g, float* Ap) {
  int64_t panels = (g.M + kGemmRows - 1) / kGemmRows;
  llamas::parallel_for(panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) pack_a_tile_panel(g, p * kGemmRows, 0, g.K, Ap + p * kGemmRows * g.K);
  });
}

// Packs B[pc:pc+kc, jc:jc+nc] as panels of kNR columns, [panel][k][kNR], zero-padded past nc.
template <typename BT>
void pack_b(const GemmArgs& g, int64_t pc, int64_t kc, int64_t jc, int64_t nc, float* Bp) {
  const BT* B = static_cast<const BT*>(g.B);
  if constexpr (std::is_same_v<BT, int8_t>) {
    // int8 panels (the only int8 layout): dequantized W columns at a time, each weight q * scale
    // as the few-row tiles form it in registers, so both paths sum the same float32 values.
    for (int64_t j = 0; j < (nc + kNR - 1) / kNR * kNR; j += Vec::W) {
      const int8_t* run = panel_run<int8_t>(g, jc + j, 0);
      const float* scales = i8_run_scales(g, jc + j);
      float* dst = Bp + (j / kNR) * kc * kNR + j % kNR;
      for (int64_t k = 0; k < kc; ++k) dequantized_run_row(run, scales, pc + k).store(dst + k * kNR);
    }
    return;
  }
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
  if constexpr (!std::is_same_v<BT, int8_t>) {  // (int8 exists only as panels)
    if (g.b_layout == BLayout::KN) {
      // Eight rows at a time, panel by panel: each panel gets 8 x 64 contiguous bytes, each source
      // row 64. Walking down a whole column panel touches a new page per row (ldb = 9 KiB at
      // N = 2304); writing one row across all panels hits 32 streams 16 KiB apart that alias in L1.
      // Either took 12% of a 256x768x2304 product.
      const int64_t padded = (nc + kNR - 1) / kNR * kNR;  // the last panel is zero-filled
      // Each row segment is only nc floats (2 KiB) before the walk jumps 8 rows on, too short for
      // the hardware prefetcher to catch: each line of this group asks for the same line of the next
      // group's 8 rows (one prefetch per 8 loads). `matmul` 1-6% faster at GPT-2's shapes
      // (interleaved calls, 2 threads); asking 2 or 3 groups ahead was no better.
      for (int64_t k0 = 0; k0 < kc; k0 += 8) {
        const int64_t k1 = imin(kc, k0 + 8), k2 = imin(kc, k1 + 8);
        for (int64_t j = 0; j < padded; j += Vec::W) {
          if (j % 16 == 0 && j < nc)
            for (int64_t k = k1; k < k2; ++k) __builtin_prefetch(B + (pc + k) * g.ldb + jc + j);
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
      const int rows = int(imin(kGemmRows, g.M - ir)), cols = int(imin(kNR, nc - jr));
      float* c = g.C + ir * g.ldc + jc + jr;
      with_tile_rows<kGemmRows>(tile_rows_for<kGemmRows>(rows), [&](auto tile) {
        micro_tile<BT, decltype(tile)::value>(g, kc, a_panel(ir), runs, ldbk, c, rows, cols, jc + jr, first, last);
      });
    }
}

// W columns of a packed B block (kc x kNR panels) starting at block column j.
inline const float* packed_run(const float* Bp, int64_t kc, int64_t j) {
  return Bp + (j / kNR) * kc * kNR + j % kNR;
}

// Columns [n0, n1) of C against all of A, packed beforehand (Ap). Float32 panels are read in
// place (a kc x 16 run of a panel stays in L1 or L2 under the row panels); any other B is packed (or,
// for bfloat16 panels, widened) block by block first: widening inside the microkernel costs two
// more instructions per B load and, with 12 accumulators, spills a register.
template <typename BT>
void packed_columns(const GemmArgs& g, const float* Ap, int64_t n0, int64_t n1) {
  bool in_place = false;
  if constexpr (std::is_same_v<BT, float>) in_place = g.b_layout == BLayout::Panels;
  ScratchBuffer Bp(in_place ? 0 : static_cast<size_t>(kColumnsKC * kColumnsNC));
  for (int64_t jc = n0; jc < n1; jc += kColumnsNC) {
    int64_t nc = imin(kColumnsNC, n1 - jc);
    for (int64_t pc = 0; pc < g.K || (pc == 0 && g.K == 0); pc += kColumnsKC) {
      int64_t kc = imin(kColumnsKC, g.K - pc);
      auto a_panel = [&](int64_t ir) {
        return Ap + (ir / kGemmRows) * kGemmRows * g.K + pc * tile_rows_for<kGemmRows>(g.M - ir);
      };
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

// Rows [m0, m1) of C against all of B: this range packs its own A blocks (kMC x kRowsKC) and its own
// copy of each B block, so tall products (weight gradients: M = 768..50257 rows against N = 768)
// read A once instead of once per column range.
// Its blocks with 16 lanes: k blocks of 512 and column blocks of 512 (a 1 MiB packed B block
// per range, its 512 x 32 micro-panels 64 KiB, beside a 240 KiB A block). Against 256 x 512 (the
// AVX2 machine's blocks), one process per build alternated 8 times on two Zen 4 cores, A^T B
// weight-gradient products at K = 512-1024: (1024, 50257)^T (1024, 768) 184.5 -> 190.6 GFLOP/s,
// (1024, 3072)^T (1024, 768) +2.4%, K = 512 +2.5%; 768 x 256 or 1024 x 256: -8% to +12% over two
// runs, mixed.
constexpr int64_t kRowsKC = Vec::W == 16 ? 512 : kKC;
constexpr int64_t kRowsNC = Vec::W == 16 ? 512 : kNC;
template <typename BT>
void packed_rows(const GemmArgs& g, int64_t m0, int64_t m1) {
  ScratchBuffer Bp(static_cast<size_t>(kRowsKC * kRowsNC));
  ScratchBuffer Ablock(static_cast<size_t>(kMC * kRowsKC));
  for (int64_t jc = 0; jc < g.N; jc += kRowsNC) {
    int64_t nc = imin(kRowsNC, g.N - jc);
    for (int64_t pc = 0; pc < g.K || (pc == 0 && g.K == 0); pc += kRowsKC) {
      int64_t kc = imin(kRowsKC, g.K - pc);
      pack_b<BT>(g, pc, kc, jc, nc, Bp.data);
      for (int64_t ic = m0; ic < m1; ic += kMC) {
        int64_t mc = imin(kMC, m1 - ic);
        for (int64_t ir = ic; ir < ic + mc; ir += kGemmRows)
          pack_a_tile_panel(g, ir, pc, kc, Ablock.data + (ir - ic) / kGemmRows * kGemmRows * kc);
        block_tiles<float>(g, kc, jc, nc, ic, ic + mc, pc == 0, pc + kc >= g.K, kNR,
                           [&](int64_t ir) { return Ablock.data + (ir - ic) / kGemmRows * kGemmRows * kc; },
                           [&](int64_t j) { return packed_run(Bp.data, kc, j); });
      }
      if (g.K == 0) break;
    }
  }
}

}  // namespace
