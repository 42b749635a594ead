#pragma once
// GEMM with B as stored and few rows of A (decode, small batches over weights not in panels):
// B streams once while the rows of C stay in L1 or in registers. Part of gemm_impl.h.
#include "cpu/gemm_tile_impl.h"

namespace {

// Elements at the start of each row of B before the first load that starts on a load-width
// boundary, when every row starts at the same offset from one (else 0). numpy places a large
// array 16 bytes past a cache line, and then every 64-byte load of B spans two lines: a Zen 4
// core read 768 x 3072 from L3 at 59-68 GB/s with B 16-48 bytes off a line, 74-79 aligned (C++
// harness, `small_m_kn`'s loop); two cores streaming a (768, 3072) B as (N, K) rows, 16 rows a
// step, read 27 GB/s against 62. Peeling keeps each C element's chain over k (or the order of
// columns) as it was, so results do not change.
template <typename BT>
int64_t aligning_head(const BT* row0, int64_t row_pitch) {
  constexpr uintptr_t kLoadBytes = Vec::W * sizeof(BT);
  const uintptr_t off = reinterpret_cast<uintptr_t>(row0) % kLoadBytes;
  if (off % sizeof(BT) || (uintptr_t(row_pitch) * sizeof(BT)) % kLoadBytes) return 0;
  return int64_t((kLoadBytes - off) % kLoadBytes / sizeof(BT));
}

// ---- small M, B stored (K, N): C[m, n] = fma chain over 8 rows of B at a time ------------------
template <typename BT>
void small_m_kn(const GemmArgs& g, int64_t n0, int64_t n1) {
  // kRows rows of B per pass: 8 concurrent row streams per thread keep enough cache-line misses
  // in flight when each thread's row segment is short (768 columns / 2 threads = 1.5 KiB).
  constexpr int kRows = 8;
  const BT* B = static_cast<const BT*>(g.B);
  // The rows of C are kept in a scratch copy placed half a page (mod 4 KiB) from where B's rows
  // are read: every pass stores them, and a later load of B whose address matched a store's low
  // 12 bits waited for it (4K aliasing). With B's row stride a multiple of 4 KiB (768 x 3072:
  // 12 KiB) all 8 row streams can match C at once. Two Zen 4 cores, 500 warm calls, builds
  // alternated 3 times: 1 x 768 x 3072 56-57 -> 66-67 GFLOP/s, 1 x 768 x 2304 62-65 -> 66-68,
  // 1 x 3072 x 768 level (numpy: 62-75).
  const int64_t width = n1 - n0, pitch = (width + 15) / 16 * 16 + 16;  // (rows 64 bytes apart mod 4 KiB)
  ScratchBuffer stage(static_cast<size_t>(g.M * pitch + 1024 + 16));
  const uintptr_t b_at = reinterpret_cast<uintptr_t>(B + n0) & 4095;
  const uintptr_t s_at = reinterpret_cast<uintptr_t>(stage.data) & 4095;
  float* C = stage.data + ((b_at + 2048 - s_at) & 4095) / 4;  // (both 4-byte aligned)
  start_rows(g, n0, n1, C, pitch);
  // The first `head` columns run as one partial vector so that the full vectors' loads of B are
  // aligned (see aligning_head).
  const int64_t head = imin(width, aligning_head(B + n0, g.ldb));
  for (int64_t k = 0; k < g.K; k += kRows) {
    int kk = int(imin(kRows, g.K - k));
    const BT* b0 = B + k * g.ldb + n0;
    for (int64_t m = 0; m < g.M; ++m) {
      const float* a = g.A + m * g.lda + k;
      float* c = C + m * pitch;
      Vec as[kRows];
      for (int i = 0; i < kRows; ++i) as[i] = Vec::set1(i < kk ? a[i] : 0.f);
      // Head, column tail, and the last k < kRows rows: same chain order, one row at a time.
      auto partial = [&](int64_t n, int lanes) {
        Vec acc = Vec::load_partial(c + n, lanes);
        for (int i = 0; i < kk; ++i) acc = Vec::fma(as[i], load_any_partial(b0 + i * g.ldb + n, lanes), acc);
        acc.store_partial(c + n, lanes);
      };
      int64_t n = 0;
      if (kk == kRows) {
        if (head > 0) partial(0, int(head)), n = head;
        for (; n + Vec::W <= width; n += Vec::W) {
          Vec acc = Vec::load(c + n);
          for (int i = 0; i < kRows; ++i) acc = Vec::fma(as[i], load_any(b0 + i * g.ldb + n), acc);
          acc.store(c + n);
        }
      }
      for (; n < width; n += Vec::W) partial(n, clamp_lanes(width - n));
    }
  }
  for (int64_t m = 0; m < g.M; ++m) std::memcpy(g.C + m * g.ldc + n0, C + m * pitch, width * sizeof(float));
  gelu_rows(g, n0, n1);
}

// ---- small M, B stored (N, K): W x W blocks of B are transposed in registers -------------------
// NB blocks of W columns x MR rows of C stay in registers over all of K: each C element is still
// one FMA chain over k ascending, and NB * MR independent chains hide the FMA latency. One row
// (decode) uses NB = 2, i.e. 16 row streams of B: one thread, 1 x 768 x 50257, streamed 12.5 GB/s
// from DRAM (CPU time) against 9.5 with one block (latency-bound chain) and 5.5 with four (32
// streams outrun the hardware prefetcher; software prefetch made it worse).
template <typename BT, int NB, int MR>
void small_m_nk_tile(const GemmArgs& g, int64_t n, int64_t m0, const int (&rows)[NB], int64_t k_head) {
  const BT* B = static_cast<const BT*>(g.B);
  Vec acc[NB][MR];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < MR; ++r) acc[b][r] = load_lanes(g.C + (m0 + r) * g.ldc + n + b * Vec::W, rows[b]);
  for (int64_t k = 0, kk = 0; k < g.K; k += kk) {
    kk = k == 0 && k_head > 0 ? imin(k_head, g.K) : clamp_lanes(g.K - k);
    for (int b = 0; b < NB; ++b) {
      Vec t[Vec::W];
      for (int i = 0; i < Vec::W; ++i) {
        const BT* src = B + (n + b * Vec::W + i) * g.ldb + k;
        t[i] = i >= rows[b] ? Vec::zero() : (kk == Vec::W ? load_any(src) : load_any_partial(src, int(kk)));
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
void small_m_nk_rows(const GemmArgs& g, int64_t m0, int64_t n0, int64_t n1, int64_t k_head) {
  int64_t n = n0;
  for (; n + NB * Vec::W <= n1; n += NB * Vec::W) {
    int rows[NB];
    for (int b = 0; b < NB; ++b) rows[b] = Vec::W;
    small_m_nk_tile<BT, NB, MR>(g, n, m0, rows, k_head);
  }
  for (; n < n1; n += Vec::W) {
    const int rows[1] = {clamp_lanes(n1 - n)};
    small_m_nk_tile<BT, 1, MR>(g, n, m0, rows, k_head);
  }
}

template <typename BT>
void small_m_nk(const GemmArgs& g, int64_t n0, int64_t n1) {
  init_rows(g, n0, n1);
  const int64_t k_head = aligning_head(static_cast<const BT*>(g.B), g.ldb);
  // Register budget (16 on AVX2): NB * MR accumulators + W transposed rows + a broadcast.
  for (int64_t m = 0; m < g.M;) {
    const int64_t left = g.M - m;
    if (left >= 4) small_m_nk_rows<BT, 1, 4>(g, m, n0, n1, k_head), m += 4;
    else if (left == 3) small_m_nk_rows<BT, 2, 3>(g, m, n0, n1, k_head), m += 3;
    else if (left == 2) small_m_nk_rows<BT, 2, 2>(g, m, n0, n1, k_head), m += 2;
    else small_m_nk_rows<BT, 2, 1>(g, m, n0, n1, k_head), m += 1;
  }
  gelu_rows(g, n0, n1);
}

}  // namespace
