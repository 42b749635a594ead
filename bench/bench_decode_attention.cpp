// Decode attention for bench_kernels: one query row per sequence over paged KV caches, float32 and
// bfloat16 (a bfloat16 model's), laid out as a model holds them (one block per 16 positions, holding
// every layer's keys and values), each step's layers run after reading other memory (the bundled
// model's 24 MB of weights; for 124M 64 MB, twice a 32 MiB L3, which is enough to push its KV out),
// as a decode step reads its weights between two visits to a layer's KV. Then one layer's calls
// again and again, its KV in cache. Each case is checked against the reference (a full score row,
// not an online softmax: close, not bit-identical) before timing.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/kernel_table.h"
#include "cpu/reference.h"
#include "llamas/allocator.h"
#include "llamas/bfloat16.h"
#include "llamas/kernel_args.h"

using namespace llamas;

namespace {

struct DecodeCase {
  const char* name;
  int seqs, context, heads, head_dim, layers;
  int64_t between_steps_mb;  // MB read before each step: the model's weights, or twice a 32 MiB L3
};

// KV blocks of `seqs` sequences, handed out in turns as a server's pool would, and each step's
// AttentionArgs per layer.
struct DecodeCaches {
  const DecodeCase& c;
  const bool bf16;  // entries bfloat16 (a bfloat16 model's cache), else float32
  int64_t blocks_per_seq, region_floats, block_floats;
  void* pool = nullptr;
  std::vector<std::vector<const void*>> k_blocks, v_blocks;  // [layer * seqs + seq] -> blocks
  std::vector<float> q, out, ref;
  std::vector<AttentionArgs> args;

  DecodeCaches(const DecodeCase& dc, bool bfloat16_entries) : c(dc), bf16(bfloat16_entries) {
    blocks_per_seq = (c.context + kKvBlockSize - 1) / kKvBlockSize;
    region_floats = int64_t(c.heads) * c.head_dim * kKvBlockSize;
    block_floats = region_floats * 2 * c.layers;
    const int64_t floats = block_floats * blocks_per_seq * c.seqs;
    const size_t entry_bytes = bf16 ? sizeof(uint16_t) : sizeof(float);
    pool = cpu_allocate(size_t(floats) * entry_bytes);
    std::mt19937 rng(7);
    std::normal_distribution<float> normal;
    for (int64_t i = 0; i < floats; ++i) {
      if (bf16) static_cast<uint16_t*>(pool)[i] = float_to_bf16(normal(rng));
      else static_cast<float*>(pool)[i] = normal(rng);
    }
    k_blocks.resize(size_t(c.layers) * c.seqs), v_blocks.resize(size_t(c.layers) * c.seqs);
    for (int64_t b = 0; b < blocks_per_seq; ++b)
      for (int s = 0; s < c.seqs; ++s) {
        char* block = static_cast<char*>(pool) + (b * c.seqs + s) * block_floats * int64_t(entry_bytes);
        for (int l = 0; l < c.layers; ++l) {
          k_blocks[size_t(l) * c.seqs + s].push_back(block + 2 * l * region_floats * int64_t(entry_bytes));
          v_blocks[size_t(l) * c.seqs + s].push_back(block + (2 * l + 1) * region_floats * int64_t(entry_bytes));
        }
      }
    const size_t row = size_t(c.heads) * c.head_dim;
    q.resize(row * c.seqs), out.resize(row * c.seqs), ref.resize(row * c.seqs);
    for (auto& x : q) x = normal(rng);
    args.resize(c.seqs);
  }
  ~DecodeCaches() { cpu_free(pool); }

  // The sequences' positions differ a little (context - 1 - s % 5), as a server's batch does.
  const AttentionArgs* layer(int l, float* into) {
    for (int s = 0; s < c.seqs; ++s) {
      AttentionArgs& a = args[s];
      a.n_head = c.heads, a.head_dim = c.head_dim, a.n_query = 1, a.first_pos = c.context - 1 - s % 5;
      a.q = q.data() + size_t(s) * c.heads * c.head_dim, a.q_stride = c.heads * c.head_dim;
      a.out = into + size_t(s) * c.heads * c.head_dim, a.out_stride = c.heads * c.head_dim;
      a.k_blocks = k_blocks[size_t(l) * c.seqs + s].data(), a.v_blocks = v_blocks[size_t(l) * c.seqs + s].data();
      a.scale = 1.0f / std::sqrt(float(c.head_dim));
      a.kv_bf16 = bf16;
    }
    return args.data();
  }

  double kv_bytes_per_layer() const {
    double positions = 0;
    for (int s = 0; s < c.seqs; ++s) positions += c.context - s % 5;
    return positions * 2.0 * c.heads * c.head_dim * (bf16 ? sizeof(uint16_t) : sizeof(float));
  }

  // Largest difference from the reference over every layer, relative to the output's scale.
  double error_vs_reference() {
    double worst = 0;
    for (int l = 0; l < c.layers; ++l) {
      cpu::kernels().attention(layer(l, out.data()), c.seqs);
      const AttentionArgs* a = layer(l, ref.data());
      for (int s = 0; s < c.seqs; ++s) cpu::reference::attention(a[s]);
      for (size_t i = 0; i < out.size(); ++i) worst = std::max(worst, double(std::fabs(out[i] - ref[i])) / (1.0 + std::fabs(ref[i])));
    }
    return worst;
  }

  // Median microseconds per layer over `steps` steps of the first `layers` layers, each step after
  // reading `other` (when given).
  double us_per_layer(int steps, int layers, const std::vector<float>* other) {
    std::vector<double> per_step;
    volatile float sink = 0;
    for (int step = 0; step < steps + 2; ++step) {
      if (other) {
        float sum = 0;
        for (size_t i = 0; i < other->size(); i += 16) sum += (*other)[i];
        sink = sink + sum;
      }
      double us = 0;
      for (int l = 0; l < layers; ++l) {
        const AttentionArgs* a = layer(l, out.data());
        auto t0 = std::chrono::steady_clock::now();
        cpu::kernels().attention(a, c.seqs);
        us += std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
      }
      if (step >= 2) per_step.push_back(us / layers);
    }
    std::sort(per_step.begin(), per_step.end());
    return per_step[per_step.size() / 2];
  }
};

}  // namespace

void print_decode_attention_table() {
  const DecodeCase cases[] = {
      {"GPT-2 124M, 1 sequence", 1, 576, 12, 64, 12, 64},
      {"bundled model, 16 sequences", 16, 40, 8, 32, 6, 24},
  };
  std::printf("\nDecode attention (float32 KV, and bfloat16 KV as a bfloat16 model holds it; one query row a sequence): each step's layers after reading the MB "
              "in the case's name (its KV then comes from DRAM, as in a decode step), and one layer's KV again and "
              "again (in cache):\n\n"
              "| variant | KV | case | context | us a layer | KV GB/s | in cache: us a layer | max rel err vs reference |\n"
              "|---|---|---|---|---|---|---|---|\n");
  for (const std::string& variant : cpu::available_variants()) {
    cpu::set_variant(variant);
    for (const DecodeCase& c : cases)
      for (bool bf16 : {false, true}) {
        DecodeCaches caches(c, bf16);
        const double err = caches.error_vs_reference();
        std::vector<float> other(size_t(c.between_steps_mb) << 18, 1.0f);
        const double cold = caches.us_per_layer(30, c.layers, &other);
        const double warm = caches.us_per_layer(200, 1, nullptr);  // one layer's KV, again and again
        std::printf("| %s | %s | %s, %lld MB between steps | %d | %.1f | %.1f | %.1f | %.1e |\n", variant.c_str(),
                    bf16 ? "bfloat16" : "float32", c.name, static_cast<long long>(c.between_steps_mb), c.context,
                    cold, caches.kv_bytes_per_layer() / cold / 1e3, warm, err);
      }
  }
}
