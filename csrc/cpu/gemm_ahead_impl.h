#pragma once
// Software requests for decode's weights ahead of their loads. Part of gemm_tile_impl.h.

namespace {

// How many k rows ahead each run of a 1-12 row decode tile (panels_small_m, dot_small_m,
// i8_small_m) asks for its panel's next lines (0: none, the hardware prefetcher alone). Decode
// streams every weight once a token, 2-8 panels side by side a thread, and on this project's Intel
// Xeon (2 cores under KVM) the hardware prefetcher alone left two threads below what they can read:
// one-row products over GPT-2 124M's packed matrices (248 MB bfloat16) read 24-26 GB/s against
// 30-31 with the requests; float32 (497 MB) 31-32 both ways. Whole decode, one process per setting,
// alternated: batch 1, 128 tokens after 512, bfloat16 100-107 -> 115-125 tok/s at 32 rows ahead (16
// rows: 114-119; 24-48 level), i.e. 1.65x float32 -> 1.9-2.0x; int8 weights 140-148 -> 164-192;
// float32 60-65 -> 63-68 (64 rows: 61-62); bfloat16 compute 93-99 -> 111-121, int8 compute 165-171
// -> 185-191 (int8 weights with bfloat16 compute level: it is bound by its dequantizing). Batches
// of 2-8 (64 tokens after 64): bfloat16 +6-13% (2), +4-12% (3-4), +15-29% (6-8); float32 +1-6%, -3%
// to +10%, +6-10%. The bundled model (weights in L3) level to +10%. The 5-12 row tiles over
// matrices of at most 2 MiB fetch the next tile instead (kStreamB). 32 rows are 2 KiB of a float32
// panel, 1 KiB bfloat16, 512 bytes int8. The same with one panel a thread (b_streamed): float32
// level. The avx2 variant on the same box, batch 1: bfloat16 +0-6% (after 512) and +10-15% (from
// 1), float32 +1-9%. A variant's Vec header turns it on by defining LLAMAS_PANEL_AHEAD_ROWS
// (avx512, avx2); NEON and generic are unmeasured, so off.
#ifndef LLAMAS_PANEL_AHEAD_ROWS
#define LLAMAS_PANEL_AHEAD_ROWS 0
#endif
template <int R, bool kStreamB>
constexpr int panels_ahead_rows() {
  if constexpr (R <= 12 && !kStreamB) return LLAMAS_PANEL_AHEAD_ROWS;
  return 0;
}

}  // namespace
