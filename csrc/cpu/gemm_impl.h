#pragma once
// GEMM, written once against Vec. Every path computes each C element as one FMA chain over k
// ascending, started from the bias, 0 or C, so all are bit-identical:
//  - B as stored, (K, N) or (N, K):
//    - small M (1..kSmallM rows): stream B once, rows of C stay in L1; bandwidth-bound.
//    - packed (prefill, training): BLIS-style blocking. A is packed into kGemmRows-row panels, B
//      into KC x NC blocks of NR = 2W-column panels; a kGemmRows x NR register tile accumulates
//      over KC.
//  - B in panels (BLayout::Panels, loaded models' weights): the packed path reads the panels in
//    place, and up to few_row_limit rows (decode, batched decode) run over all of K per tile.
// Parts: gemm_tile_impl.h (constants, A panels, B runs, the microkernel), gemm_small_m_impl.h
// (stored B, few rows), gemm_packed_impl.h (the blocked path), gemm_panels_impl.h (panels, few
// rows), gemm_bf16_dot_impl.h (bfloat16 activations), gemm_i8_dot_impl.h (int8 activations); this
// file picks the path.
#include "cpu/gemm_tile_impl.h"
#include "cpu/gemm_small_m_impl.h"
#include "cpu/gemm_packed_impl.h"
#include "cpu/gemm_panels_impl.h"
#include "cpu/gemm_bf16_dot_impl.h"
#include "cpu/gemm_i8_dot_impl.h"
#include "llamas/error.h"

namespace {

template <typename BT>
void gemm_typed(const GemmArgs& g) {
  if (g.b_layout == BLayout::Panels) {
    if (g.M <= kGemmRows) return panels_small_m<BT, kGemmRows>(g);
    if (g.M <= few_row_limit<BT>()) return panels_few_rows<BT>(g);
  } else if constexpr (!std::is_same_v<BT, int8_t>) {  // (int8 exists only as panels)
    if (g.M <= kSmallM && !g.a_trans) {
      // 64 columns = a whole number of cache lines per thread range.
      llamas::parallel_for(g.N, 64, [&](int64_t n0, int64_t n1) {
        if (g.b_layout == BLayout::KN) small_m_kn<BT>(g, n0, n1);
        else small_m_nk<BT>(g, n0, n1);
      });
      return;
    }
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
  // (The ops layer only builds these; a caller that does not would read the wrong layout.)
  if (g.b_i8 && g.b_layout != BLayout::Panels) llamas::fail_text("gemm", "int8 weights exist only as panels");
  if (g.a_bf16 && !((g.b_bf16 || g.b_i8) && g.b_layout == BLayout::Panels && !g.a_trans))
    llamas::fail_text("gemm", "bfloat16 compute needs bfloat16 or int8 panels and A stored as rows");
  if (g.a_i8 && !(g.b_i8 && g.b_layout == BLayout::Panels && !g.a_trans && !g.a_bf16))
    llamas::fail_text("gemm", "int8 compute needs int8 panels and A stored as rows");
  if (g.M == 0 || g.N == 0) return;
  if (g.a_i8) {
    static const bool hardware = i8_dot_native();
    return gemm_i8_dot(g, hardware);
  }
  if (g.a_bf16) {
    static const bool hardware = bf16_dot_native();
    return gemm_bf16_dot(g, hardware);
  }
  if (g.b_i8) gemm_typed<int8_t>(g);
  else if (g.b_bf16) gemm_typed<uint16_t>(g);
  else gemm_typed<float>(g);
}

}  // namespace
