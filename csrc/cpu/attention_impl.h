#pragma once
// Causal attention over a paged KV cache, written once against Vec. Flash-attention style: each
// query row walks the key blocks in order with an online softmax (running max m, running sum l,
// unnormalised output O), so the T x T score matrix never exists. A few query rows share each
// key/value load; every row's arithmetic is the same whether it runs alone (decode) or in a group
// (prefill), so decode and prefill give bit-identical rows. KV entries (KT) are float32 or bfloat16,
// widened in registers as they are loaded, or int8: a block's 16 scores are then multiplied by
// their keys' scales, and its probabilities by their values' scales before P V (their sum, the
// softmax's denominator, is taken before), so the scales cost two multiplies per row and block.
#include <cmath>
#include <type_traits>

#include "llamas/allocator.h"
#include "llamas/kv_block.h"
#include "llamas/parallel.h"

namespace {

using llamas::AttentionArgs;
using llamas::kKvBlockSize;

constexpr int kKeyVecs = kKvBlockSize / Vec::W;       // registers per block of scores
// Query rows sharing each K/V load. AVX2: 6 rows (12 score accumulators per parity pass, 12 for
// P V): ops.attention at T=512, 12 heads of 64, 34.8-35.7 -> 40.8-44.2 GFLOP/s against 2 rows
// (3 rows: 38-39, 4 rows: 38-40; interleaved calls), bit-identical.
constexpr int kAttnRows = Vec::W == 16 ? 4 : Vec::W == 8 ? 6 : 2;
constexpr int kMaxHeadDim = 256;
// KV blocks per online-softmax step: one running-max check, one rescale of O and one reduction of
// the probabilities' sum a step instead of a block. Steps start at multiples of kStepBlocks (the
// block index from position 0), so a row meets the same steps alone (decode) as in a group
// (prefill), where the group's trailing keys past the row are masked and add exact zeros. GPT-2
// 124M's 512-token prefill, builds alternated 3 times: attention 25.4-26.6 -> 23.6-25.2 ms; batch-1
// decode at 513-640 and the bundled model's 1- and 16-sequence steps level (decode attention reads
// its KV from memory, where the arithmetic saved does not show).
constexpr int kStepBlocks = 4;

// f(std::integral_constant<int, nb>{}) for a step of nb = 1..kStepBlocks blocks.
template <typename F>
inline void with_step_blocks(int nb, F&& f) {
  static_assert(kStepBlocks == 4, "one case per step size");
  switch (nb) {
    case 4: return f(std::integral_constant<int, 4>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 2: return f(std::integral_constant<int, 2>{});
    default: return f(std::integral_constant<int, 1>{});
  }
}
// Partial sums per score (see RowGroup::step_scores) and the registers they may take before the
// chains run one after another: 16 of AVX2's 16 registers hold 8 accumulators, AVX-512's 32 hold 16.
constexpr int kScoreChains = Vec::W == 16 ? 4 : 2;
constexpr int kScoreRegisters = Vec::W == 16 ? 16 : 8;

// The state of nrows consecutive query rows of one head, walked over the KV blocks in order.
// nrows is a template parameter so that the per-row accumulators stay in registers: with a
// run-time row count GCC kept them on the stack and the P V loop ran at a third of its speed
// (decode attention took 520 us per layer at 540 positions, 3.4x the bandwidth bound).
template <int nrows, typename KT>
struct RowGroup {
  alignas(64) float qs[nrows][kMaxHeadDim];
  alignas(64) float acc_out[nrows][kMaxHeadDim + Vec::W];
  alignas(64) float probs[nrows][kStepBlocks * kKvBlockSize];
  float run_max[nrows], run_sum[nrows], corr[nrows];
  int64_t pos[nrows];
  int64_t last_pos = 0, n_blocks = 0;

  void init(const AttentionArgs& a, int head, int64_t t0) {
    const int hd = a.head_dim;
    for (int r = 0; r < nrows; ++r) {
      pos[r] = a.first_pos + t0 + r;
      const float* q = a.q + (t0 + r) * a.q_stride + int64_t(head) * hd;
      for (int d = 0; d < hd; ++d) qs[r][d] = q[d] * a.scale;
      for (int d = 0; d < hd + Vec::W; ++d) acc_out[r][d] = 0.f;
      run_max[r] = -INFINITY;
      run_sum[r] = 0.f;
    }
    last_pos = pos[nrows - 1];
    n_blocks = last_pos / kKvBlockSize + 1;
  }

  // The step's scores and probabilities over blocks [b0, b0 + NB) (reads their keys; for int8
  // entries also the values' scales, which scale the probabilities) and the running max and sum.
  template <int NB>
  void step_scores(const AttentionArgs& a, int head, int64_t b0) {
    const int hd = a.head_dim;
    constexpr int kVecs = NB * kKeyVecs;  // score registers per row and chain
    constexpr bool kInt8 = std::is_same_v<KT, int8_t>;
    const KT* kt[NB];
    const float* k_scales[NB] = {};
    const float* v_scales[NB] = {};
    for (int b = 0; b < NB; ++b) {
      kt[b] = static_cast<const KT*>(a.k_blocks[b0 + b]) + int64_t(head) * hd * kKvBlockSize;
      if constexpr (kInt8) {
        k_scales[b] = llamas::kv_i8_scales(static_cast<const int8_t*>(a.k_blocks[b0 + b]), a.n_head, hd) +
                      head * kKvBlockSize;
        v_scales[b] = llamas::kv_i8_scales(static_cast<const int8_t*>(a.v_blocks[b0 + b]), a.n_head, hd) +
                      head * kKvBlockSize;
      }
    }
    const int64_t step_pos = b0 * kKvBlockSize;
    // No software prefetch of the next block: measured with and without (this machine, float32),
    // prefill attention (T=512, 12 heads of 64) ran ~15% faster without the ~128 prefetches per
    // head and block, and decode at contexts 80..976 the same or 5-10% faster; the hardware
    // prefetchers follow the contiguous 24 KiB runs a thread's heads make per block.
    // Scores: kScoreChains partial sums over d (chain d % kScoreChains) hide the FMA latency: 2 with
    // 8 lanes; with 16 lanes a block's 16 keys are one register per row, so a decode row has only
    // its chains in flight: 4 chains (32 cycles of latency a block at 32 dims, not 64), with P V
    // in 2 registers at a time below, took the bundled model's decode attention (context ~130,
    // two Zen 4 cores, builds alternated) from 7.1-10.3 to 6.4 us a layer at one sequence and
    // from 133-142 to 101-125 at sixteen; prefill attention (T = 512, 12 heads of 64) unchanged.
    // Each key's score is the same sum whatever the step's block count.
    Vec s[nrows][kScoreChains][kVecs];
    for (int r = 0; r < nrows; ++r)
      for (int p = 0; p < kScoreChains; ++p)
        for (int v = 0; v < kVecs; ++v) s[r][p][v] = Vec::zero();
    auto score_dim = [&](int d, int chain) {
      Vec kv[kVecs];
      for (int b = 0; b < NB; ++b)
        for (int v = 0; v < kKeyVecs; ++v) kv[b * kKeyVecs + v] = load_any(kt[b] + d * kKvBlockSize + v * Vec::W);
      for (int r = 0; r < nrows; ++r) {
        Vec qd = Vec::set1(qs[r][d]);
        for (int v = 0; v < kVecs; ++v) s[r][chain][v] = Vec::fma(qd, kv[v], s[r][chain][v]);
      }
    };
    if constexpr (nrows * kVecs * kScoreChains > kScoreRegisters) {
      // Too many rows for every chain's sums in registers: one chain's dims at a time. Each chain
      // still sums its dims in ascending order, as the interleaved loop does.
      for (int chain = 0; chain < kScoreChains; ++chain)
        for (int dim = chain; dim < hd; dim += kScoreChains) score_dim(dim, chain);
    } else {
      int dim = 0;
      for (; dim + kScoreChains <= hd; dim += kScoreChains)
        for (int c = 0; c < kScoreChains; ++c) score_dim(dim + c, c);
      for (; dim < hd; ++dim) score_dim(dim, dim % kScoreChains);
    }
    for (int r = 0; r < nrows; ++r) {
      int64_t visible = pos[r] - step_pos + 1;  // keys of this step at or before the row
      Vec sc[kVecs];
      Vec vmax = Vec::set1(-INFINITY);
      for (int v = 0; v < kVecs; ++v) {
        Vec sum = s[r][0][v] + s[r][1][v];
        if constexpr (kScoreChains == 4) sum = sum + (s[r][2][v] + s[r][3][v]);
        if constexpr (kInt8) sum = sum * Vec::load(k_scales[v / kKeyVecs] + v % kKeyVecs * Vec::W);
        sc[v] = Vec::select_first(clamp_lanes(visible - v * Vec::W), sum, Vec::set1(-INFINITY));
        vmax = Vec::max(vmax, sc[v]);
      }
      // Once the running max settles, no lane of a step is above it: then the new max is the old
      // one exactly, found with one compare instead of a reduce on the path from the scores to
      // P V. Prefill attention in GPT-2 124M (T = 512, 12 heads of 64), builds alternated 3
      // times: 28.4-29.8 -> 26.1-28.0 ms (steps of one block).
      float new_max = run_max[r];
      if (vmax.any_above(run_max[r])) {
        const float step_max = vmax.reduce_max();  // (a compare: std::fmax is a libm call here)
        new_max = run_max[r] > step_max ? run_max[r] : step_max;
      }
      // exp(-inf) = 0 exactly (see vexp), so masked keys add nothing and a fully masked step
      // leaves m, l and O bit-for-bit unchanged.
      // Once the running max settles it rarely moves: then the factor is exp(0) = 1 exactly, as
      // vexp would give, without its ~20 dependent instructions per row and step.
      corr[r] = new_max == run_max[r] ? 1.0f : vexp(Vec::set1(run_max[r] - new_max)).reduce_max();
      Vec m = Vec::set1(new_max);
      Vec psum = Vec::zero();
      for (int v = 0; v < kVecs; ++v) {
        Vec p = vexp(sc[v] - m);
        psum = psum + p;
        if constexpr (kInt8) p = p * Vec::load(v_scales[v / kKeyVecs] + v % kKeyVecs * Vec::W);  // (lanes past the written keys: never read)
        p.store(probs[r] + v * Vec::W);
      }
      run_sum[r] = run_sum[r] * corr[r] + psum.reduce_add();
      run_max[r] = new_max;
    }
  }

  // O = O * corr + P V over the step's keys written so far (never past the group's last
  // position), with corr and P from step_scores.
  template <int NB>
  void step_values(const AttentionArgs& a, int head, int64_t b0) {
    const int hd = a.head_dim;
    const KT* vb[NB];
    int keys[NB];
    for (int b = 0; b < NB; ++b) {
      vb[b] = static_cast<const KT*>(a.v_blocks[b0 + b]) + int64_t(head) * kKvBlockSize * hd;
      keys[b] = int(imin(kKvBlockSize, last_pos - (b0 + b) * kKvBlockSize + 1));
    }
    // kPvVecs registers of head_dim per row at a time: nrows * kPvVecs independent FMA chains over
    // the keys (one register per row, as before, left one 16-long chain per row in flight); then
    // 2 at a time, so that a head of 2 registers (the bundled model's 32 dims with 16 lanes) keeps
    // two chains, not one after the other. Each element's sum is the same either way. AVX-512's
    // 32 registers hold 4 rows x 4 (each key's probabilities broadcast once for 64 dims, not
    // twice): prefill attention in GPT-2 124M 23.9-25.0 -> 22.9-23.5 ms, builds alternated 3 times.
    constexpr int kPvVecs = nrows * 4 <= (Vec::W == 16 ? 16 : 8) ? 4 : 2;
    int d = 0;
    for (; d + kPvVecs * Vec::W <= hd; d += kPvVecs * Vec::W) pv_registers<kPvVecs, NB>(d, hd, keys, vb);
    if constexpr (kPvVecs > 2)
      for (; d + 2 * Vec::W <= hd; d += 2 * Vec::W) pv_registers<2, NB>(d, hd, keys, vb);
    // The rest (head_dim not a multiple of kPvVecs registers) one register at a time; acc_out is
    // padded to whole registers, so only the V loads need the lane count.
    for (; d < hd; d += Vec::W) {
      const int lanes = clamp_lanes(hd - d);
      Vec o[nrows];
      for (int r = 0; r < nrows; ++r) o[r] = Vec::load(acc_out[r] + d) * Vec::set1(corr[r]);
      for (int b = 0; b < NB; ++b)
        for (int j = 0; j < keys[b]; ++j) {
          const KT* row = vb[b] + int64_t(j) * hd + d;
          Vec vj = lanes == Vec::W ? load_any(row) : load_any_partial(row, lanes);
          for (int r = 0; r < nrows; ++r) o[r] = Vec::fma(Vec::set1(probs[r][b * kKvBlockSize + j]), vj, o[r]);
        }
      for (int r = 0; r < nrows; ++r) o[r].store(acc_out[r] + d);
    }
  }

  // O[:, d:d+V registers] = O * corr + P V over this step's keys, in ascending key order.
  template <int V, int NB>
  void pv_registers(int d, int hd, const int (&keys)[NB], const KT* const (&vb)[NB]) {
    Vec o[nrows][V];
    for (int r = 0; r < nrows; ++r)
      for (int v = 0; v < V; ++v) o[r][v] = Vec::load(acc_out[r] + d + v * Vec::W) * Vec::set1(corr[r]);
    for (int b = 0; b < NB; ++b)
      for (int j = 0; j < keys[b]; ++j) {
        Vec vj[V];
        for (int v = 0; v < V; ++v) vj[v] = load_any(vb[b] + int64_t(j) * hd + d + v * Vec::W);
        for (int r = 0; r < nrows; ++r) {
          const Vec p = Vec::set1(probs[r][b * kKvBlockSize + j]);
          for (int v = 0; v < V; ++v) o[r][v] = Vec::fma(p, vj[v], o[r][v]);
        }
      }
    for (int r = 0; r < nrows; ++r)
      for (int v = 0; v < V; ++v) o[r][v].store(acc_out[r] + d + v * Vec::W);
  }

  void finish(const AttentionArgs& a, int head, int64_t t0) {
    const int hd = a.head_dim;
    for (int r = 0; r < nrows; ++r) {
      float* out = a.out + (t0 + r) * a.out_stride + int64_t(head) * hd;
      Vec inv = Vec::set1(1.0f / run_sum[r]);
      for (int d = 0; d < hd; d += Vec::W) {
        int lanes = clamp_lanes(hd - d);
        (Vec::load_partial(acc_out[r] + d, lanes) * inv).store_partial(out + d, lanes);
      }
    }
  }
};

template <int nrows, typename KT>
void attention_rows(const AttentionArgs& a, int head, int64_t t0) {
  RowGroup<nrows, KT> g;
  g.init(a, head, t0);
  for (int64_t b0 = 0; b0 < g.n_blocks; b0 += kStepBlocks)
    with_step_blocks(int(imin(kStepBlocks, g.n_blocks - b0)), [&](auto nb) {
      g.template step_scores<decltype(nb)::value>(a, head, b0);
      g.template step_values<decltype(nb)::value>(a, head, b0);
    });
  g.finish(a, head, t0);
}

// One query row (decode) over heads [h0, h1), steps outermost, and in each step every head's
// scores before any head's P V: a thread then reads each block's keys for its heads as one
// contiguous run (6 heads of 64: 24 KiB), then their values as another, where scores and P V per
// head alternated 4 KiB runs of keys and values (2 KiB for heads of 32). Per head the arithmetic is
// attention_rows<1>'s, bit for bit. Both versions in one process, calls alternated, KV from DRAM
// (a 24-64 MB read between steps): the bundled model's 16 sequences at context 37 0.84-0.89x the
// time a layer, GPT-2 124M at context 550 0.88-0.98x; in whole steps, builds alternated 8 times:
// 16 sequences' attention 349 -> 294 us a step (+3% tok/s), 124M at 513-609 163 -> 149 us a layer.
template <typename KT>
void attention_heads(const AttentionArgs& a, int h0, int h1, int64_t t) {
  constexpr int kHeadsTogether = 8;  // 8 states of ~2.4 KiB on the stack
  for (int hb = h0; hb < h1; hb += kHeadsTogether) {
    const int n = h1 - hb < kHeadsTogether ? h1 - hb : kHeadsTogether;
    RowGroup<1, KT> g[kHeadsTogether];
    if (a.new_k) llamas::kv_write_new_position<KT>(a, hb, hb + n);  // these heads' new key and value first
    for (int i = 0; i < n; ++i) g[i].init(a, hb + i, t);
    for (int64_t b0 = 0; b0 < g[0].n_blocks; b0 += kStepBlocks)
      with_step_blocks(int(imin(kStepBlocks, g[0].n_blocks - b0)), [&](auto nb) {
        for (int i = 0; i < n; ++i) g[i].template step_scores<decltype(nb)::value>(a, hb + i, b0);
        for (int i = 0; i < n; ++i) g[i].template step_values<decltype(nb)::value>(a, hb + i, b0);
      });
    for (int i = 0; i < n; ++i) g[i].finish(a, hb + i, t);
  }
}

// Query rows [t0, t0 + kAttnRows) of one head, or the rows left at the end one at a time.
template <typename KT>
void attention_group(const AttentionArgs& a, int head, int64_t t0) {
  if (a.n_query - t0 >= kAttnRows) attention_rows<kAttnRows, KT>(a, head, t0);
  else
    for (int64_t t = t0; t < a.n_query; ++t) attention_rows<1, KT>(a, head, t);
}

void attention(const AttentionArgs* seqs, int n_seqs) {
  // Work items: (sequence, head, group of kAttnRows query rows), sequences then heads outermost,
  // so a static split gives each thread whole heads of comparable causal cost.
  int64_t* first_item = static_cast<int64_t*>(llamas::cpu_allocate((n_seqs + 1) * sizeof(int64_t)));
  first_item[0] = 0;
  for (int s = 0; s < n_seqs; ++s) {
    int64_t groups = (seqs[s].n_query + kAttnRows - 1) / kAttnRows;
    first_item[s + 1] = first_item[s] + groups * seqs[s].n_head;
  }
  // Several sequences (a server's batch): 4 ranges per thread, so a thread preempted by the event
  // loop does not leave the other waiting. One sequence keeps one range of heads per thread.
  const int pieces = n_seqs > 1 ? 4 : 1;
  llamas::parallel_for(first_item[n_seqs], 1, [&](int64_t i0, int64_t i1) {
    int s = 0;
    for (int64_t item = i0; item < i1; ++item) {
      while (item >= first_item[s + 1]) ++s;
      const AttentionArgs& a = seqs[s];
      int64_t local = item - first_item[s];
      int64_t groups = (a.n_query + kAttnRows - 1) / kAttnRows;
      int head = int(local / groups);
      int64_t t0 = (local % groups) * kAttnRows;
      if (a.n_query == 1) {  // decode: this range's run of heads of this sequence together
        const int64_t run_end = imin(i1, first_item[s + 1]);
        if (a.kv_i8) attention_heads<int8_t>(a, head, head + int(run_end - item), 0);
        else if (a.kv_bf16) attention_heads<uint16_t>(a, head, head + int(run_end - item), 0);
        else attention_heads<float>(a, head, head + int(run_end - item), 0);
        item = run_end - 1;
      } else if (a.kv_i8) {
        attention_group<int8_t>(a, head, t0);
      } else if (a.kv_bf16) {
        attention_group<uint16_t>(a, head, t0);
      } else {
        attention_group<float>(a, head, t0);
      }
    }
  }, pieces);
  llamas::cpu_free(first_item);
}

}  // namespace
