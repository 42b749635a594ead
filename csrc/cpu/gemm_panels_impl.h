#pragma once
// GEMM over B in the panel layout with few rows of A: decode (one register tile of rows) and a
// server's batched decode (a few tiles). Part of gemm_impl.h.
#include "cpu/gemm_tile_impl.h"

namespace {

// ---- Panels: B stored in the GEMM's own layout (ops::pack_panels) ----------------------------
// ceil(M / R) row panels of A, packed here in one pass; then each thread walks its columns' panels
// once, running every row panel over all of K per tile of RUNS registers. kStreamB: the row panels'
// passes share the fetching of the next tile's B (see micro_tile); pass p asks for rows from
// p K / panels on, one per 2^shift k steps (2^shift <= panels, so the passes cover every row).
// pieces: ranges per thread.
// kRowsOfA: the tiles read A's rows in place instead of packed [k][R] panels: one row panel of
// exactly M rows, A stored as rows (panels_rows passes it only then; see panels_small_m).
template <typename BT, int R, int RUNS, bool kStreamB, int R_LAST = R, bool kRowsOfA = false>
void panels_tiled(const GemmArgs& g, int pieces) {
  static_assert(!kRowsOfA || R_LAST == R, "rows in place: one row panel of exactly M rows");
  const int64_t panels = (g.M + R - 1) / R;
  // A last row panel of at most R_LAST rows runs R_LAST-row tiles: no FMA on padded rows.
  const bool small_last = R_LAST < R && g.M % R != 0 && g.M % R <= R_LAST;
  ScratchBuffer Ap(kRowsOfA ? 0 : static_cast<size_t>(panels * R * (g.K > 0 ? g.K : 1)));
  const float* a_panels = kRowsOfA ? g.A : Ap.data;
  auto pack = [&](int64_t p) {
    if (small_last && p == panels - 1) pack_a_panel<R_LAST>(g, p * R, 0, g.K, Ap.data + p * R * g.K);
    else pack_a_panel<R>(g, p * R, 0, g.K, Ap.data + p * R * g.K);
  };
  // Several row panels: the threads of the region pack them, each claiming the next, and every
  // range starts once all are packed (they all read every panel). Packed by the calling thread
  // before the region, 16 rows' two panels cost ~70 us of a bundled-model step while the other
  // thread waited: 16-sequence steps 1.68 -> 1.52, 1.98 -> 1.85 and 1.99 -> 1.83 ms (medians of
  // 5-8, builds alternated, three runs).
  const bool shared_pack = !kRowsOfA && panels > 1;
  SharedPanelPack packing;
  if (!kRowsOfA && !shared_pack)
    for (int64_t p = 0; p < panels; ++p) pack(p);
  constexpr int64_t kCols = RUNS * Vec::W;
  int next_shift = 0;
  while ((int64_t(2) << next_shift) <= panels) ++next_shift;
  llamas::parallel_for(g.N, kCols, [&](int64_t n0, int64_t n1) {
    if (shared_pack) packing.run(panels, pack);
    const BT* runs[RUNS];
    const BT* next[RUNS];
    for (int j = 0; j < RUNS; ++j) next[j] = panel_run<BT>(g, n0 + j * Vec::W, 0);
    for (int64_t col = n0; col < n1; col += kCols) {
      for (int j = 0; j < RUNS; ++j) runs[j] = next[j], next[j] = panel_run<BT>(g, col + kCols + j * Vec::W, 0);
      const bool more = kStreamB && col + kCols < n1;
      const int cols = int(imin(kCols, n1 - col));
      for (int64_t p = 0; p < panels; ++p) {
        const int rows = int(imin(R, g.M - p * R));
        const float* a = a_panels + p * R * g.K;
        float* c = g.C + p * R * g.ldc + col;
        if (small_last && p == panels - 1)
          micro_tile<BT, R_LAST, RUNS, kStreamB>(g, g.K, a, runs, kPanelWidth, c, rows, cols, col, true, true,
                                                 more ? next : nullptr, p * g.K / panels, next_shift);
        else
          micro_tile<BT, R, RUNS, kStreamB, kRowsOfA, panels_ahead_rows<R, kStreamB>()>(
              g, g.K, a, runs, kPanelWidth, c, rows, cols, col, true, true, more ? next : nullptr, p * g.K / panels,
              next_shift);
      }
    }
  }, pieces);
}

// R = M rows as one row panel: read in place when kInPlace and A is stored as rows, else packed.
template <typename BT, int R, int RUNS, bool kStreamB, bool kInPlace>
void panels_rows(const GemmArgs& g) {
  if constexpr (kInPlace) {
    if (!g.a_trans) return panels_tiled<BT, R, RUNS, kStreamB, R, true>(g, 1);
  }
  panels_tiled<BT, R, RUNS, kStreamB>(g, 1);
}

// Up to kGemmRows rows (decode, small batches): R = M rows exactly, so no FMA is spent on padding,
// and each thread streams one range of columns' panels front to back (one range per thread keeps
// its memory stream contiguous).
template <typename BT, int R>
void panels_small_m(const GemmArgs& g) {
  if constexpr (R > 1) {
    if (g.M < R) return panels_small_m<BT, R - 1>(g);
  }
  // Wide tiles for few rows: 8-16 independent FMA chains hide the FMA latency (2 chains would cap a
  // thread at 64 bytes of B per 4 cycles, below what L3 delivers for small models), and each tile
  // streams 2-4 panels side by side, so more of B is in flight per thread. Interleaved decode
  // steps against the narrower tiles before (1 row: 4 runs, 2 rows: 4, 3-4 rows: 2): the bundled
  // model at batch 1 1,188 -> 1,340 tok/s, 2: +2-5%, 3: +15-17%, 4: +8-9%; GPT-2 124M at batch 1
  // +4-5% (float32) and +3-4% (bfloat16), 3: +16%, 4: +13%. (Four rows x 4 runs is 16
  // accumulators, and still beat 4 x 3 in both models: the FMAs take B from memory operands.)
  // Those runs were counted in 8-lane registers (Zen 3, AVX2): 8 runs were 4 panels side by side.
  // With 16 lanes the same counts streamed 8 panels (1 row) and 6 (2 rows) at once, and on Zen 4
  // more concurrent streams per thread read DRAM slower (two threads summing 480 MB in S streams
  // each: 4 streams 59-63 GB/s, 8 streams 52-55, 16 streams 45 when the box's memory is fast;
  // 35-37 for 2-8 streams when it is slow). So with 16 lanes: 4 runs (4 panels), except one row of
  // narrower weights, whose widening needs the 8 chains (int8 with 4 runs: 2-30% slower; bfloat16
  // level). Products interleaved in one process, 768 x 2304 from L3 and twelve 768 x 3072 from
  // DRAM: one float32 row 4-13% and 5-14% faster (3-6% at all nine bundled-model and GPT-2 shapes
  // from cache); two rows float32 10% and 2%, bfloat16 13-15% and 3-8%, int8 weights 14-17% and
  // 4-11%. GPT-2 124M float32 batch-1 decode +8% when memory is fast; the bundled model level.
  constexpr int kRuns = Vec::W == 16 ? (R == 1 && sizeof(BT) < 4 ? 8 : R <= 4 ? 4 : 2)
                                     : (R == 1 ? 8 : R == 2 ? 6 : R <= 4 ? 4 : 2);
  // 2-8 rows: the tiles broadcast A from its own rows (g.lda apart) instead of from a [k][R] panel
  // packed first. That one panel was packed by the calling thread while the other waited, and then
  // pulled into the other core's cache: 4 rows x 1024 x 256 took 27.2 us against 3 rows' 16.8.
  // One process per build, alternated 4-6 times, 24 MB of distinct weights cycled (as a step finds
  // them in L3), float32: 2 rows 1.08-1.60x as fast at 256x768, 1024x256, 768x2304 and 3072x768,
  // level at 256x4096; 3 rows 1.02-1.14x; 4 rows 1.18-1.73x (0.95x at 256x4096); 5-6 rows
  // 1.06-1.61x; 8 rows 0.99-1.22x; bfloat16 and int8 weights alike. Not 9-12 rows: at 12, A rows
  // 12 KiB apart (K = 3072) share one L1 set (8 ways) and 3072x768 ran 0.80x. With 8 lanes (the
  // avx2 variant on the same machine) 2-4 rows 0.98-1.32x, but 5-6 rows 0.75-1.01x (16 registers:
  // the row addresses crowd the 5-6 x 2 tiles), so up to 4 there; NEON unmeasured, unchanged.
  // Whole steps (one process per build, alternated 6 times): the bundled model at 4 sequences
  // 0.748 -> 0.597 ms, 6: 0.913 -> 0.827, 3: +4%, 2 and 8 level; GPT-2 124M at 2-8 sequences level
  // (its steps stream 475 MB of weights). Bit-identical: only where each broadcast comes from.
  // (One row was always read in place, with every width: the copy of it ran on the calling thread
  // while the others waited, pulling the row, written by the previous op's threads, out of their
  // caches. Bundled model, one sequence, 25 GEMMs a step, builds alternated: step 0.30-0.38 ->
  // 0.25-0.28 ms (median 0.32 -> 0.26); GPT-2 124M batch-1 decode level (bandwidth-bound).)
  constexpr bool kRowsInPlace = R == 1 || (Vec::W == 16 ? R <= 8 : Vec::W == 8 ? R <= 4 : false);
  // Weights from memory (a model larger than the last-level cache: GemmArgs::b_streamed), one row
  // (batch-1 decode): one panel at a time, so each thread reads one contiguous stream as a plain
  // sum does, instead of 4-8 panels side by side; and two ranges a thread, claimed as threads come
  // free, so the thread whose part reads faster takes more of the matrix instead of waiting at the
  // end of each of a token's ~50 products. 1-row products over GPT-2 124M's 494 MB of matrices,
  // the same packed matrices read both ways in turn for 60-80 s, each pass beside a two-thread
  // torch sum of as many bytes (this box's memory switches between a slow mode, sums at ~32 GB/s,
  // and a fast one, ~51-54): float32 1.02-1.03x in the slow mode and 1.04-1.07x in the fast one,
  // bfloat16 (against 8 panels) 1.04-1.08x and 0.98-1.03x. (Each half alone, one panel against the
  // panels side by side and two ranges against one, had shown 1.10-1.29x and 1.14-1.21x in the
  // fast mode in single runs: that mode's samples are too uneven to trust past +-10%. 3 or 4 ranges
  // a thread: 0.87-1.15x of two.) Whole batch-1 decode, builds alternated: within their +-4%.
  // Not for 2-4 rows (their chains need the panels side by side: float32 0.93-1.02x, bfloat16
  // 0.82-0.92x), not for weights in cache (the bundled model's 23 MB from L3: 0.93x, one FMA chain a
  // thread), not int8, whose widening needs the 8 chains (0.5-0.7x), and 16 lanes only (the avx2
  // variant on this box, a panel in two registers against 4 panels: 1.00x slow, 0.85x fast).
  if constexpr (R == 1 && Vec::W == 16 && !std::is_same_v<BT, int8_t>) {
    constexpr int kStreamedRangesPerThread = 2;
    if (g.b_streamed) return panels_tiled<BT, 1, 1, false, 1, true>(g, kStreamedRangesPerThread);
  }
  if constexpr (Vec::W == 16 && R >= 5) {
    // 16 lanes, 5-12 rows (a server's step of 5-12 sequences, a speculative step's drafts): more
    // runs than the 8-lane table's 2 (5-6 rows x 4 registers and 7-8 x 3 fit AVX-512's 32), and
    // for a matrix of at most 2 MiB, which a model's step finds in L3, the row panels' passes
    // fetch the next tile's weights (kStreamB, as the 13-48 row tiles do). A larger matrix streams
    // from DRAM, where those fetches compete with the tile's own loads. Bundled model, steps of
    // 5-12 sequences interleaved in one process: 10-25% faster (8 sequences 1.43 -> 1.19 and
    // 1.52 -> 1.21 ms); GPT-2 124M at 5 and 8 sequences 5-8% faster, at 12 level. (The fetches
    // for every size: 124M 5-8% slower; K <= 1024 as the rule: the same.)
    constexpr int kWide = R <= 6 ? 4 : R <= 8 ? 3 : 2;
    if (g.K * g.N * int64_t(sizeof(BT)) <= (int64_t(2) << 20)) return panels_rows<BT, R, kWide, true, kRowsInPlace>(g);
    return panels_rows<BT, R, kWide, false, kRowsInPlace>(g);
  }
  panels_rows<BT, R, kRuns, false, kRowsInPlace>(g);
}

// A few register tiles of rows (a server's batched decode step: 7..16 sequences, and the steps
// that also take a new request's prompt rows). The blocked path's parallel packing of A and its
// k/row blocking cost more than the product itself at these sizes (16 x 256 x 256 is 2 MFLOP:
// ~12 us on 2 cores). One column range per thread, as for decode: each range's first tile has no
// earlier tile to fetch its B, and one contiguous stream per thread keeps the hardware prefetcher
// on it. Against 4 ranges per thread (meant to let a thread the server's event loop preempts hand
// ranges to the other), the bundled model's 16-row products ran 8% faster in sequence with B from
// DRAM, and `serve_load` at 16 clients gave 2,846 / 3,049 output tok/s against 2,801 / 2,620
// (interleaved runs).
// Up to how many rows: with 8-lane registers, 30 float32 rows (5 row panels) and 36 bfloat16 ones
// (6). Bundled-model steps of 16 sequences plus a prompt, interleaved against the blocked path
// (the limit was 24): float32 at 25-30 rows 3-7% faster, at 32-48 rows 6-15% slower; bfloat16 at
// 25-32 rows 12-18% faster, at 36 5%, at 42-48 2% slower. (For bfloat16 the blocked path first
// widens each B block to float32 in a pass of its own; these tiles widen in registers.) Other
// widths keep 4 row panels (unmeasured).
template <typename BT>
constexpr int64_t few_row_limit() {
  if constexpr (Vec::W == 8 && kGemmRows == 6) return std::is_same_v<BT, float> ? 30 : 36;
  return 4 * kGemmRows;
}
constexpr int kFewRowRangesPerThread = 1;

template <typename BT>
void panels_few_rows(const GemmArgs& g) {
  // With 8-lane registers, the tile that pads the fewest rows:
  //  - 6-row tiles and a last 4-row one (6 x 2 and 4 x 2 registers) when 3 or 4 rows are left
  //    over from 9 rows on (10 = 6 + 4, 16 = 6 + 6 + 4, 22, 28), and for 14 bfloat16 rows: no FMA
  //    on padding, and fewer passes over each B tile than 4 x 3. Interleaved steps of the bundled
  //    model against the tiles below: 16 rows float32 4-5% faster than 8 x 2, bfloat16 (14-16
  //    rows) 8-9%; 9-10 rows 6-9% faster than 6 x 2 (bfloat16 6-21%); 21-22 and 27-28 rows 3-5%
  //    faster than 6 x 2 and 4 x 3 (bfloat16 -4% to +6%). Not 15 float32 rows (4-11% slower than
  //    8 x 2) nor 7-8 (8-20% slower).
  //  - 8 rows x 2 registers for 7-8 and 13-15 rows (each B tile serves 2 passes instead
  //    of 4 at 16 sequences). 16 accumulators do not fit beside the B registers: GCC keeps 3 on
  //    the stack, and in cache this tile is slower than 4 x 3 (48 against 68 GFLOP/s, one core,
  //    16 x 256 x 1024); it wins when B comes from DRAM. Against 4 x 3: the bundled model's
  //    16-sequence step +4.5-7%, 8 sequences +4.5% (interleaved steps); 16 x K x N products with
  //    B from DRAM at GPT-2 shapes 3-12% faster. At 24 rows (a tie with 6 x 2) it was 2% slower,
  //    and at 12 or 20 rows it pads 4 more.
  //  - 4 rows x 3 registers when they pad fewer rows than 6 x 2 (19-20 and 25-26 rows), also one
  //    B load fewer per 12 FMAs (7 against 8). (24-column tiles straddle panels: float32 only,
  //    bfloat16 tiles load whole interleaved panels.)
  if constexpr (Vec::W == 8 && kGemmRows == 6) {
    const int64_t pad8 = (g.M + 7) / 8 * 8, pad6 = (g.M + 5) / 6 * 6, pad4 = (g.M + 3) / 4 * 4;
    const bool bf16 = !std::is_same_v<BT, float>;
    const int64_t left = g.M % 6;
    if ((g.M >= 9 && (left == 3 || left == 4) && (bf16 || g.M != 15)) || (bf16 && g.M == 14))
      return panels_tiled<BT, 6, 2, true, 4>(g, kFewRowRangesPerThread);
    if (g.M <= 16 && pad8 < pad6 && pad8 <= pad4) return panels_tiled<BT, 8, 2, true>(g, kFewRowRangesPerThread);
    if constexpr (std::is_same_v<BT, float>)
      if (pad4 < pad6) return panels_tiled<BT, 4, 3, true>(g, kFewRowRangesPerThread);
  }
  if constexpr (Vec::W == 16 && kGemmRows == 12) {
    // 16 lanes (AVX-512), 13-48 rows (M <= 12 runs panels_small_m): 8-row x 2-register tiles, a
    // last one of 4 rows when 1-4 are left, except 17-20 rows: 12 + a last tile of 8. A 12-row
    // tile over padding had taken a third of the 16-row products' FMAs (111-136 GFLOP/s on two
    // Zen 4 cores). 1,000 calls per shape, panels warm, builds alternated 3 times: 16 rows as
    // 8 + 8 against 12 + 4: 16 x 256 x 1024 166-188 -> 179-200 GFLOP/s, 16 x 1024 x 256 138-151 ->
    // 156-180, 16 x 256 x 4096 185-190 -> 197-216; at 24-48 rows 8-row tiles against 12-row ones
    // +2-7%; at 20 rows 12 + 8 beat 8 + 8 + 4 (156-159 against 138-154).
    if (g.M > 16 && g.M <= 20) return panels_tiled<BT, 12, 2, true, 8>(g, kFewRowRangesPerThread);
    if (g.M % 8 != 0 && g.M % 8 <= 4) return panels_tiled<BT, 8, 2, true, 4>(g, kFewRowRangesPerThread);
    return panels_tiled<BT, 8, 2, true>(g, kFewRowRangesPerThread);
  }
  panels_tiled<BT, kGemmRows, 2, true>(g, kFewRowRangesPerThread);
}

}  // namespace
