#pragma once
// The GEMM's building blocks, written once against Vec (see gemm_impl.h): constants, scratch
// buffers, edge loads and stores, A panel packing, panel runs of B and the register-tile
// microkernel every blocked path runs.
#include <atomic>
#include <cstring>
#include <type_traits>

#include "llamas/allocator.h"
#include "llamas/parallel.h"
#include "cpu/gemm_ahead_impl.h"

namespace {

using llamas::BLayout;
using llamas::GemmArgs;
using llamas::kPanelWidth;

constexpr int kNR = 2 * Vec::W;    // columns per register tile
static_assert(kPanelWidth % Vec::W == 0, "a register's columns must lie in one stored panel");
constexpr int64_t kKC = 256;       // packed B micro-panel: 256 x 2W floats = 16 KiB (AVX2), in L1
constexpr int64_t kMC = 120;       // packed A block: 120 x kc floats (120 KiB at 256, 360 at 768), in L2
constexpr int64_t kNC = 512;       // packed B block: 256 x 512 floats = 512 KiB, in L2/L3
// The float32 blocked path's blocks (packed_columns). With 16 lanes: k blocks of 768 (GPT-2's
// whole K = 768; a 768 x 32 B micro-panel, 96 KiB, is read from L2) and column blocks of 256
// (the 768 KiB packed B block, beside a 360 KiB A block, stays mostly in the 1 MiB+ L2 of
// AVX-512 cores): each C tile is loaded and stored once per k block, a third as often as with
// 256. Zen 4, 2 threads, one process per build alternated 6 times, `matmul` and prepacked B at
// 256 and 512 rows of GPT-2's shapes: 1.8-6.0% faster at every one (kc 512 or nc 128 about as
// fast; kc 256, the AVX2 machine's choice, the slowest). Other widths keep kKC and kNC.
// Column blocks of 128 since session 28, on a 2-core Intel Xeon (2 MiB L2 a core): a float32
// prefill of 512 tokens of GPT-2 124M took 320-323 ms with 256, 305-306 with 128 (299-304 with
// 64, 335 with 512; kc 1536 instead of 768: no faster), every GEMM of it 3-8% faster; on Zen 4,
// 128 was as fast as 256 (above).
constexpr int64_t kColumnsKC = Vec::W == 16 ? 768 : kKC;
constexpr int64_t kColumnsNC = Vec::W == 16 ? 128 : kNC;
constexpr int64_t kSmallM = 8;     // at or below this many rows, stream B instead of packing it
// Up to this many rows a product is a server's batched decode step (bfloat16 and int8 compute run
// it in few-row tiles that fetch the next column tile's weights: NextTileLines).
constexpr int64_t kBatchedDecodeRows = 48;

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

// Columns [n0, n1) of every row's starting values, into rows `pitch` floats apart at dst: C's own
// values with accumulate, else the bias or 0.
inline void start_rows(const GemmArgs& g, int64_t n0, int64_t n1, float* dst, int64_t pitch) {
  for (int64_t m = 0; m < g.M; ++m) {
    float* c = dst + m * pitch;
    const float* from = g.accumulate ? g.C + m * g.ldc + n0 : g.bias ? g.bias + n0 : nullptr;
    if (from == c) continue;
    if (from) std::memcpy(c, from, (n1 - n0) * sizeof(float));
    else std::memset(c, 0, (n1 - n0) * sizeof(float));
  }
}

// C[m, n0:n1] = bias or 0 before the FMA chains start (with accumulate, C stays as it is).
inline void init_rows(const GemmArgs& g, int64_t n0, int64_t n1) { start_rows(g, n0, n1, g.C + n0, g.ldc); }

inline void gelu_rows(const GemmArgs& g, int64_t n0, int64_t n1) {
  if (!g.gelu) return;
  for (int64_t m = 0; m < g.M; ++m) {
    float* c = g.C + m * g.ldc;
    int64_t n = n0;
    for (; n + Vec::W <= n1; n += Vec::W) vgelu(Vec::load(c + n)).store(c + n);
    if (n < n1) vgelu(Vec::load_partial(c + n, int(n1 - n))).store_partial(c + n, int(n1 - n));
  }
}

// ---- A panels, B runs and the microkernel ----------------------------------------------------
// One A panel: rows [row0, row0+R) and k in [pc, pc+kc), stored [k][R], zero-padded past M.
template <int R = kGemmRows>
inline void pack_a_panel(const GemmArgs& g, int64_t row0, int64_t pc, int64_t kc, float* dst) {
  const int rows = int(imin(R, g.M - row0));
  int64_t k = 0;
  if constexpr (R >= 4 && R <= Vec::W) {
    // W steps of k at a time: the panel's rows as W-wide loads, transposed in registers, each k's
    // R values stored as one whole register. Its lanes past R land on the next k's slots, which
    // the next store overwrites, so the loop stops where a store would pass the panel's end (the
    // rest go through the loop below). Gathering one float per row and k instead, a 16 x 1024
    // pack took 21.5 us in 6-row panels (now 2.2) and 4.6 in 8-row ones (now 2.5), while the
    // other thread waited. Bundled-model steps of 15-16 sequences plus a 3-14 token prompt
    // (18-30 rows, 6- and 4-row panels), interleaved: 2-22% faster, float32 and bfloat16.
    if (!g.a_trans)
      for (; (k + Vec::W - 1) * R + Vec::W <= kc * R; k += Vec::W) {
        Vec t[Vec::W];
        for (int i = 0; i < Vec::W; ++i) t[i] = i < rows ? Vec::load(g.A + (row0 + i) * g.lda + pc + k) : Vec::zero();
        transpose_square(t);
        for (int j = 0; j < Vec::W; ++j) t[j].store(dst + (k + j) * R);
      }
  }
  if constexpr (R <= Vec::W) {
    // A^T stored (K, M) (weight gradients): each k's R values are one contiguous run, moved as one
    // register. Its lanes past R land on the next k's slots (overwritten by the next store), so the
    // last k goes through the loop below. A load of W floats stays inside A's row when W rows are
    // left; otherwise only the panel's rows are loaded and the rest are zero (the padding).
    // Copied one float at a time, this pack was 17% of a (1024, 50257)^T x (1024, 768) product.
    if (g.a_trans) {
      const bool whole = row0 + Vec::W <= g.M;
      for (; k + 1 < kc; ++k) {
        const float* src = g.A + (pc + k) * g.lda + row0;
        (whole ? Vec::load(src) : Vec::load_partial(src, rows)).store(dst + k * R);
      }
    }
  }
  for (; k < kc; ++k) {
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

// The register tile's rows for a row panel of `rows` (<= R) rows of A in a product tiled by R
// rows: the last panel runs a 4- or 8-row tile when that covers it, instead of R rows of which the
// rest are padding. Its A panel is packed with that many rows per k, in the same place, so the k
// block at pc starts pc * tile_rows_for<R>(rows) entries into it. With 12-row tiles, 256 rows end
// on 4 (8 of 264 rows' FMAs were padding, 3%), 512 on 8, 1024 on 4. Each element is still one FMA
// chain over k in the same order: the same bits.
template <int R>
constexpr int tile_rows_for(int64_t rows) {
  return rows <= 4 && R > 4 ? 4 : rows <= 8 && R > 8 ? 8 : R;
}

// Calls f(std::integral_constant<int, T>{}) with T = tile, one of tile_rows_for<R>'s values, so
// the packing and the tile of a last narrow panel are picked in one place.
template <int R, typename F>
inline void with_tile_rows(int tile, F&& f) {
  if constexpr (R > 8)
    if (tile == 8) return f(std::integral_constant<int, 8>{});
  if constexpr (R > 4)
    if (tile == 4) return f(std::integral_constant<int, 4>{});
  f(std::integral_constant<int, R>{});
}

// Packs row panel [row0, row0 + kGemmRows) of A (k in [pc, pc + kc)) at dst, tile_rows_for its
// rows per k.
inline void pack_a_tile_panel(const GemmArgs& g, int64_t row0, int64_t pc, int64_t kc, float* dst) {
  with_tile_rows<kGemmRows>(tile_rows_for<kGemmRows>(g.M - row0),
                            [&](auto rows) { pack_a_panel<decltype(rows)::value>(g, row0, pc, kc, dst); });
}

// A variant's Vec header may define LLAMAS_TILE_EDGES_INLINE: the tile's start and finish are then
// forced inline with their loops unrolled, so acc is only ever indexed by constants and stays in
// registers. Without that, GCC 12 for AArch64 kept acc in memory (start_tile out of line took its
// address, and a rolled row loop indexed it) and stored all 16 accumulators back on every pass
// of the k loop (16 stores against 64 FMLAs); with it, the loop has no stack traffic (objdump).
// GCC for x86 keeps the accumulators in registers either way, so its variants leave it off.
// clang needs it on x86 too: clang 14's avx512 variant ran the 256-row float32 GEMMs at 79-92
// GFLOP/s without it and at 176-204 with it, against GCC 12's 174-203 (docs/PORTING.md#clang).
#if defined(__clang__) && !defined(LLAMAS_TILE_EDGES_INLINE)
#define LLAMAS_TILE_EDGES_INLINE 1
#endif
#ifdef LLAMAS_TILE_EDGES_INLINE
#define LLAMAS_TILE_EDGE inline __attribute__((always_inline))
#define LLAMAS_UNROLL_TILE_ROWS _Pragma("GCC unroll 16")
#define LLAMAS_UNROLL_TILE_REGS _Pragma("GCC unroll 8")
#else
#define LLAMAS_TILE_EDGE inline
#define LLAMAS_UNROLL_TILE_ROWS
#define LLAMAS_UNROLL_TILE_REGS
#endif

// A register tile's accumulators before its k loop: the bias (or 0) in the first k block, else the
// C rows so far (rows past `rows` start at 0 and are never stored). lanes[j]: register j's columns.
template <int R, int REGS>
LLAMAS_TILE_EDGE void start_tile(const GemmArgs& g, Vec (&acc)[R][REGS], int (&lanes)[REGS], const float* C,
                                 int rows, int cols, int64_t col0, bool first) {
  for (int j = 0; j < REGS; ++j) lanes[j] = clamp_lanes(cols - j * Vec::W);
  if (first && !g.accumulate) {
    LLAMAS_UNROLL_TILE_REGS
    for (int j = 0; j < REGS; ++j) {
      Vec start = g.bias ? load_lanes(g.bias + col0 + j * Vec::W, lanes[j]) : Vec::zero();
      LLAMAS_UNROLL_TILE_ROWS
      for (int i = 0; i < R; ++i) acc[i][j] = start;
    }
  } else {
    LLAMAS_UNROLL_TILE_ROWS
    for (int i = 0; i < R; ++i)
      LLAMAS_UNROLL_TILE_REGS
      for (int j = 0; j < REGS; ++j) acc[i][j] = i < rows ? load_lanes(C + i * g.ldc + j * Vec::W, lanes[j]) : Vec::zero();
  }
}

// Stores a tile's rows (GELU first after the last k block).
template <int R, int REGS>
LLAMAS_TILE_EDGE void finish_tile(const GemmArgs& g, const Vec (&acc)[R][REGS], const int (&lanes)[REGS], float* C,
                                  int rows, bool last) {
#ifdef LLAMAS_TILE_EDGES_INLINE
  LLAMAS_UNROLL_TILE_ROWS
  for (int i = 0; i < R; ++i) {
    if (i >= rows) break;  // (a constant bound: unrolled, acc's indices are constants)
#else
  for (int i = 0; i < rows; ++i) {
#endif
    LLAMAS_UNROLL_TILE_REGS
    for (int j = 0; j < REGS; ++j) {
      Vec c = acc[i][j];
      if (last && g.gelu) c = vgelu(c);
      store_lanes(C + i * g.ldc + j * Vec::W, c, lanes[j]);
    }
  }
}

// W columns of the stored panels at column col (a multiple of W) and row k. A run past the last
// panel (the tail of a tile wider than the panels left) reads the last panel instead: those lanes
// are never stored. bfloat16 rows are interleaved (bf16_panel_slot), so
// for them this is the row of col's whole panel, read with load_bf16_panel.
// int8 panels are records of i8_panel_bytes (rows, then their scales: i8_run_scales).
template <typename BT>
inline const BT* panel_run(const GemmArgs& g, int64_t col, int64_t k) {
  const int64_t p = imin(col / kPanelWidth, (g.N - 1) / kPanelWidth);
  if constexpr (std::is_same_v<BT, int8_t>)
    return static_cast<const int8_t*>(g.B) + p * llamas::i8_panel_bytes(g.K) + k * kPanelWidth + col % kPanelWidth;
  const BT* row = static_cast<const BT*>(g.B) + (p * g.K + k) * kPanelWidth;
  if constexpr (std::is_same_v<BT, uint16_t>) return row;
  else return row + col % kPanelWidth;
}

// The scales of the int8 run at column col: block b's at + b * kPanelWidth (same clamp as panel_run).
inline const float* i8_run_scales(const GemmArgs& g, int64_t col) {
  const int64_t p = imin(col / kPanelWidth, (g.N - 1) / kPanelWidth);
  const int8_t* panel = static_cast<const int8_t*>(g.B) + p * llamas::i8_panel_bytes(g.K);
  return reinterpret_cast<const float*>(panel + g.K * kPanelWidth) + col % kPanelWidth;
}

// Row k of an int8 run as float32 weights, q * scale (one rounding): what the few-row tiles use in
// registers and the blocked path's dequantized B blocks hold, so both sum the same values.
inline Vec dequantized_run_row(const int8_t* run, const float* scales, int64_t k) {
  return Vec::load_i8(run + k * kPanelWidth) * Vec::load(scales + k / llamas::kI8Block * kPanelWidth);
}

// Row panels of A packed by the threads of one parallel region together: each claims the next
// panel, and then waits until all are packed (every column range reads every panel).
struct SharedPanelPack {
  std::atomic<int64_t> next{0}, packed{0};
  template <typename Pack>
  void run(int64_t panels, Pack&& pack) {
    for (int64_t p; (p = next.fetch_add(1, std::memory_order_relaxed)) < panels;) {
      pack(p);
      packed.fetch_add(1, std::memory_order_release);
    }
    for (int spin = 0; packed.load(std::memory_order_acquire) < panels; ++spin) llamas::spin_pause(spin);
  }
};

// A batched decode step's products stream their weights from L3 or DRAM once, then serve a few
// row tiles from L1. The row tiles of one column tile share the fetching of the next column tile's
// weights of this k pass, lines [begin, end) each, one line a k step (one line holds a pair of
// bfloat16 panel rows or a quad of int8 ones); panels[j] is the next tile's panel j at the pass's
// first row. (The float32 tiles do the same through micro_tile's kStreamB.)
template <int P>
struct NextTileLines {
  const char* panels[P];
  int64_t lines_per_panel = 0, begin = 0, end = 0;
  // Sets begin and end to row tile `tile`'s share of the lines among `tiles`.
  void share(int64_t tile, int64_t tiles) {
    begin = tile * P * lines_per_panel / tiles, end = (tile + 1) * P * lines_per_panel / tiles;
  }
  // A tile's walk over its share: fetch() asks for the next line, if any, with no division per step.
  struct Cursor {
    const NextTileLines* tiles = nullptr;
    const char* at = nullptr;
    int64_t left = 0, left_in_panel = 0;
    int panel = 0;
    explicit Cursor(const NextTileLines* t) : tiles(t) {
      if (!t || t->end <= t->begin || t->lines_per_panel <= 0) return;
      panel = int(t->begin / t->lines_per_panel);
      const int64_t offset = t->begin % t->lines_per_panel;
      at = t->panels[panel] + offset * 64, left = t->end - t->begin, left_in_panel = t->lines_per_panel - offset;
    }
    void fetch() {
      if (left <= 0) return;
      __builtin_prefetch(at);
      at += 64, --left;
      if (--left_in_panel == 0 && left > 0) at = tiles->panels[++panel], left_in_panel = tiles->lines_per_panel;
    }
  };
};

// One R x (RUNS * W) tile of C over kc steps of k: A is a packed panel [k][R]; B is RUNS runs of W
// columns with k stride ldbk (a packed block: Bp + j * W, kNR; Panels: columns of the stored
// panels, 16; bfloat16 panels: one whole interleaved panel row per kPanelWidth / W runs, so those
// tiles start on panel boundaries). The blocked path's tile is 6 x 2 runs; decode's few rows take
// 4-8 runs (see panels_small_m).
// kStreamB (a batched decode step: B streams from memory once, then serves several row panels from
// L1): the caller passes the next tile's runs as `next`, and each k step asks for the line of their
// k row next_row0 + (k >> next_shift) (clamped to kc - 1): every row panel's pass fetches its own
// share of the next tile's B (16-64 KiB), so the fetches spread over the whole tile instead of
// bursting during its first pass. Against that burst (all rows in the first pass) the spread ran
// 16 x 256 x {768, 1024, 4096} products with B from DRAM 7-27% faster (interleaved medians,
// 49-76 -> 55-96 GFLOP/s); without any prefetch the B loads were the hottest instruction of a
// 16-sequence step. Not for one or two rows: the extra instructions cost GPT-2 124M's batch-1
// decode 12% (Zen 4); those tiles ask for their own runs' lines ahead instead (kAheadRows > 0, see
// panels_ahead_rows).
template <typename BT, int R = kGemmRows, int RUNS = 2, bool kStreamB = false, bool kRowsOfA = false,
          int kAheadRows = 0>
void micro_tile(const GemmArgs& g, int64_t kc, const float* Ap, const BT* const (&B)[RUNS], int64_t ldbk, float* C,
                int rows, int cols, int64_t col0, bool first, bool last, const BT* const* next = nullptr,
                int64_t next_row0 = 0, int next_shift = 0) {
  Vec acc[R][RUNS];
  int lanes[RUNS];
  start_tile(g, acc, lanes, C, rows, cols, col0, first);
  // int8 runs (row-0 runs of int8 panels): their scale rows.
  const float* scales[std::is_same_v<BT, int8_t> ? RUNS : 1];
  if constexpr (std::is_same_v<BT, int8_t>)
    for (int j = 0; j < RUNS; ++j) scales[j] = i8_run_scales(g, col0 + j * Vec::W);
  // One k step of the tile: W x RUNS columns of B against R broadcast rows of A.
  // kRowsOfA: Ap is A's first row itself (rows g.lda apart), not a packed [k][R] panel.
  const int64_t a_rows_apart = kRowsOfA ? g.lda : 1;
  auto k_step = [&](int64_t k) __attribute__((always_inline)) {
    const float* a = kRowsOfA ? Ap + k : Ap + k * R;
    if constexpr (std::is_same_v<BT, int8_t>) {
      // int8: each weight is q * scale as a float32 product, then the same FMA chain as float32.
      // (ldbk is kPanelWidth: int8 runs are only the stored panels' own.)
      Vec b[RUNS];
      for (int j = 0; j < RUNS; ++j) b[j] = dequantized_run_row(B[j], scales[j], k);
      for (int i = 0; i < R; ++i) {
        Vec ai = Vec::set1(a[i * a_rows_apart]);
        for (int j = 0; j < RUNS; ++j) acc[i][j] = Vec::fma(ai, b[j], acc[i][j]);
      }
    } else if constexpr (std::is_same_v<BT, uint16_t>) {
      // bfloat16: widen and use one panel row at a time. Widening all of a tile's panels first held
      // RUNS widened registers next to the accumulators, and GCC spilled them. One or two rows'
      // broadcasts are made once per k step; more would not fit beside the accumulators.
      constexpr int kPerPanel = int(kPanelWidth / Vec::W);
      static_assert(RUNS % kPerPanel == 0, "bfloat16 panel tiles cover whole panels");
      constexpr bool kHoist = R <= 2;
      Vec hoisted[kHoist ? R : 1];
      if constexpr (kHoist)
        for (int i = 0; i < R; ++i) hoisted[i] = Vec::set1(a[i * a_rows_apart]);
      auto a_row = [&](int i) {
        if constexpr (kHoist) return hoisted[i];
        else return Vec::set1(a[i * a_rows_apart]);
      };
      for (int j = 0; j < RUNS; j += kPerPanel) {
        Vec b[kPerPanel];
        Vec::load_bf16_panel(B[j] + k * ldbk, b);
        for (int i = 0; i < R; ++i) {
          const Vec ai = a_row(i);
          for (int jj = 0; jj < kPerPanel; ++jj) acc[i][j + jj] = Vec::fma(ai, b[jj], acc[i][j + jj]);
        }
      }
    } else {
      Vec b[RUNS];
      for (int j = 0; j < RUNS; ++j) b[j] = load_any(B[j] + k * ldbk);
      for (int i = 0; i < R; ++i) {
        Vec ai = Vec::set1(a[i * a_rows_apart]);
        for (int j = 0; j < RUNS; ++j) acc[i][j] = Vec::fma(ai, b[j], acc[i][j]);
      }
    }
  };
  // The next tile's B at k row `row`: one line per stored panel it spans.
  auto prefetch_next_row = [&](int64_t row) __attribute__((always_inline)) {
    for (int j = 0; j < RUNS; j += kPanelWidth / Vec::W) __builtin_prefetch(next[j] + row * ldbk);
  };
  // Four k steps per loop iteration: the pointer and counter updates of a rolled loop (~5 scalar
  // instructions per 12 FMAs) cost the 6x16 tile ~10% (75 -> 83 GFLOP/s, one core, L1/L2 data).
  auto plain_steps = [&](int64_t k0) __attribute__((always_inline)) {
#pragma GCC unroll 4
    for (int64_t k = k0; k < kc; ++k) k_step(k);
  };
  if constexpr (kStreamB && R * RUNS <= 12) {
    // The next tile's lines are asked for 8 k steps at a time (the same lines as one per
    // 2^next_shift steps; next_shift <= 3 here): a line address computed and clamped at every k
    // step put ~8 scalar instructions beside each step's 12 FMAs, the hottest ones in the loop.
    // A bundled-model step's GEMMs, 2 threads, both versions interleaved in one process: 16 rows
    // (6 + 6 + 4) 9-20% faster in most runs (two of eleven ran level), 12, 24 and 30 rows 11-22%,
    // bfloat16 16 rows 7-10%. Not for the 8 x 2 tile, whose 16 accumulators spill: 3-4% slower,
    // bfloat16 7-12%.
    if (next) {
      int64_t k = 0;
      for (; k + 8 <= kc; k += 8) {
        const int64_t row0 = next_row0 + (k >> next_shift);
        for (int i = 0; i < (8 >> next_shift); ++i) prefetch_next_row(imin(row0 + i, kc - 1));
#pragma GCC unroll 8
        for (int64_t kk = k; kk < k + 8; ++kk) k_step(kk);
      }
      plain_steps(k);
    } else {
      plain_steps(0);
    }
  } else if constexpr (kAheadRows > 0) {
    // Each run asks for its own panel's line kAheadRows k rows ahead, one request per line (see
    // panels_ahead_rows); 4 k steps per iteration, as plain_steps unrolls them.
    constexpr int64_t kRowBytes = kPanelWidth * int64_t(sizeof(BT));
    constexpr int64_t kStepsPerLine = kRowBytes >= 64 ? 1 : 64 / kRowBytes;
    static_assert(kStepsPerLine <= 4, "at least one request each 4 k steps");
    int64_t k = 0;
    for (; k + 4 <= kc; k += 4) {
      for (int64_t s = 0; s < 4; s += kStepsPerLine)
        for (int j = 0; j < RUNS; j += int(kPanelWidth / Vec::W)) __builtin_prefetch(B[j] + (k + s + kAheadRows) * ldbk);
#pragma GCC unroll 4
      for (int64_t kk = k; kk < k + 4; ++kk) k_step(kk);
    }
    plain_steps(k);
  } else {
#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; ++k) {
      if constexpr (kStreamB)
        if (next) prefetch_next_row(imin(next_row0 + (k >> next_shift), kc - 1));
      k_step(k);
    }
  }
  finish_tile(g, acc, lanes, C, rows, last);
}

}  // namespace
