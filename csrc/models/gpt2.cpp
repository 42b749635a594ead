#include "models/gpt2.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "llamas/cpu_features.h"
#include "llamas/error.h"
#include "llamas/ops.h"
#include "llamas/parallel.h"
#include "llamas/profiler.h"

namespace llamas {

Sequence::Sequence(const GPT2Config& c, const SamplingParams& params, uint64_t seed)
    : cache(int(c.n_layer), int(c.n_head), int(c.n_embd / c.n_head), c.n_positions), sampler(params, seed) {}

void Sequence::truncate(int64_t n) {
  LLAMAS_CHECK(n >= 0 && n <= int64_t(tokens.size()), "kv_cache", "cannot truncate a sequence of ", tokens.size(),
               " tokens to ", n);
  cache.truncate(n);
  tokens.resize(size_t(n));
}

GPT2Model::GPT2Model(const GPT2Config& config, GPT2Weights weights)
    // The KV cache keeps the weights' dtype; int8 weights keep bfloat16 entries (int8 is only a
    // weight format here).
    : config_(config), weights_(std::move(weights)),
      kv_dtype_(weights_.dtype == DType::I8 ? DType::BF16 : weights_.dtype) {
  config_.validate();
  LLAMAS_CHECK(int64_t(weights_.layers.size()) == config_.n_layer, "gpt2", "weights have ", weights_.layers.size(),
               " layers, config says ", config_.n_layer);
  mark_streamed();
}

void GPT2Model::set_kv_dtype(DType dtype) {
  LLAMAS_CHECK(dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::I8, "gpt2",
               "kv_dtype must be float32, bfloat16 or int8, got ", dtype_name(dtype));
  kv_dtype_ = dtype;
}

namespace {
// Whether the weights can run with `compute` activations: bfloat16 and int8 compute read panels
// only (gemm_bf16_dot_impl.h, gemm_i8_dot_impl.h), of the dtypes ops::compute_fits allows.
bool computes_in(DType compute, const GPT2Weights& w) {
  return compute == DType::F32 || (w.packed() && ops::compute_fits(compute, w.dtype));
}
}  // namespace

void GPT2Model::set_compute_dtype(DType dtype) {
  LLAMAS_CHECK(dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::I8, "gpt2",
               "compute_dtype must be float32, bfloat16 or int8, got ", dtype_name(dtype));
  LLAMAS_CHECK(dtype != DType::BF16 || computes_in(dtype, weights_), "gpt2",
               "compute_dtype bfloat16 needs bfloat16 or int8 weights (load with dtype='bfloat16' or 'int8'); "
               "these are ", dtype_name(weights_.dtype));
  LLAMAS_CHECK(dtype != DType::I8 || computes_in(dtype, weights_), "gpt2",
               "compute_dtype int8 needs int8 weights (load with dtype='int8'); these are ", dtype_name(weights_.dtype));
  compute_dtype_ = dtype;
}

void GPT2Model::set_weights(GPT2Weights weights) {
  LLAMAS_CHECK(int64_t(weights.layers.size()) == config_.n_layer, "gpt2", "weights have ", weights.layers.size(),
               " layers, config says ", config_.n_layer);
  LLAMAS_CHECK(computes_in(compute_dtype_, weights), "gpt2", "this model computes in ", dtype_name(compute_dtype_),
               " and cannot take ", dtype_name(weights.dtype), " weights");
  weights_ = std::move(weights);
  mark_streamed();
}

void GPT2Model::mark_streamed() {
  // Weights larger than the last-level cache come from memory at every token: their one-row
  // products read one panel at a time (see panels_small_m).
  const bool streamed = int64_t(weights_.bytes()) > last_level_cache_bytes();
  for (auto& layer : weights_.layers)
    for (ops::PackedMatrix* p : layer.panels()) p->streamed = streamed;
  weights_.lm_head_p.streamed = streamed;
}

namespace {

// y = x @ W (+ bias) (GELU) over `rows` rows: W's panels when the model was loaded, else W as
// stored (`layout`: Conv1D matrices are (K, N), the tied lm_head (N, K)).
// compute: the model's compute_dtype (its panels suit it: set_compute_dtype checks).
void linear_rows(const float* x, int64_t rows, int64_t K, const Tensor& w, BLayout layout,
                 const ops::PackedMatrix& packed, const Tensor* bias, bool gelu, float* y, DType compute) {
  GemmArgs g;
  g.M = rows, g.K = K;
  if (packed.defined()) {
    g.N = packed.N, g.B = packed.data.raw(), g.b_bf16 = packed.dtype() == DType::BF16;
    g.b_i8 = packed.dtype() == DType::I8;
    g.b_layout = BLayout::Panels, g.ldb = K, g.b_streamed = packed.streamed;
    g.a_bf16 = compute == DType::BF16, g.a_i8 = compute == DType::I8;
  } else {
    g.N = layout == BLayout::KN ? w.dim(1) : w.dim(0), g.B = w.raw(), g.b_bf16 = w.dtype() == DType::BF16;
    g.b_layout = layout, g.ldb = w.dim(1);
  }
  g.A = x, g.lda = K;
  g.bias = bias ? bias->data<float>() : nullptr;
  g.C = y, g.ldc = g.N;
  g.gelu = gelu;
  ops::gemm(g);
}

}  // namespace

void GPT2Model::run_chunks(const std::vector<Chunk>& chunks, float* logits) {
  const GPT2Config& c = config_;
  const int64_t C = c.n_embd, F = c.ffn(), H = c.n_head, hd = C / H, V = c.vocab_size;
  int64_t R = 0, logit_rows = 0;
  for (auto& ch : chunks) {
    LLAMAS_CHECK(ch.n > 0, "gpt2", "a sequence chunk must have at least one token");
    LLAMAS_CHECK(ch.cache->length() + ch.n <= c.n_positions, "gpt2", "sequence of ", ch.cache->length() + ch.n,
                 " tokens exceeds the context length ", c.n_positions);
    LLAMAS_CHECK(ch.cache->blocks() == 0 || ch.cache->dtype() == kv_dtype_, "gpt2", "this sequence's KV cache holds ",
                 dtype_name(ch.cache->dtype()), " entries but the model writes ", dtype_name(kv_dtype_),
                 " (a sequence started with a model of another kv_dtype)");
    for (int64_t i = 0; i < ch.n; ++i)
      LLAMAS_CHECK(ch.tokens[i] >= 0 && ch.tokens[i] < V, "gpt2", "token id ", ch.tokens[i],
                   " is out of range [0, ", V, ")");
    R += ch.n;
    logit_rows += ch.all_logits ? ch.n : 1;
  }
  // Activations for all rows of the step, from the caching allocator (reused every step).
  Tensor x = Tensor::empty({R, C}, DType::F32);
  Tensor ln = Tensor::empty({R, C}, DType::F32);
  Tensor qkv = Tensor::empty({R, 3 * C}, DType::F32);
  Tensor att = Tensor::empty({R, C}, DType::F32);
  Tensor delta = Tensor::empty({R, C}, DType::F32);
  Tensor fc = Tensor::empty({R, F}, DType::F32);
  Tensor ids = Tensor::empty({R}, DType::I32);
  std::vector<int64_t> positions(R);
  std::vector<int64_t> first_row(chunks.size());
  {
    int64_t row = 0;
    for (size_t s = 0; s < chunks.size(); ++s) {
      first_row[s] = row;
      const int64_t start = chunks[s].cache->length();
      if (chunks[s].cache->blocks() == 0) chunks[s].cache->set_dtype(kv_dtype_);
      chunks[s].cache->reserve(start + chunks[s].n);
      for (int64_t i = 0; i < chunks[s].n; ++i, ++row) {
        ids.data<int32_t>()[row] = chunks[s].tokens[i];
        positions[row] = start + i;
      }
    }
  }
  {
    ProfileRegion region("embedding");
    // From the tied lm_head's panels (a bfloat16 model's, from a float32 checkpoint, hold wte
    // rounded to bfloat16, as its output layer uses it): wte's mapped pages were released after
    // packing, and looking rows up in the mapping brought them back one by one (a 124M server's RSS
    // grew by up to the table's 154 MB as tokens appeared).
    const ops::PackedMatrix* panels = weights_.packed() ? &weights_.lm_head_p : nullptr;
    ops::embedding(ids.data<int32_t>(), positions.data(), R, weights_.wte, weights_.wpe, x.data<float>(), panels);
  }
  // The KV writes of each layer, as runs of rows that stay inside one cache block.
  struct KvWriteTask {
    size_t chunk;
    int64_t row0, row1;
  };
  std::vector<KvWriteTask> kv_tasks;
  for (size_t s = 0; s < chunks.size(); ++s) {
    if (chunks[s].n == 1) continue;  // a decoding sequence's key and value: written by attention
    for (int64_t i = 0; i < chunks[s].n;) {
      const int64_t row = first_row[s] + i;
      const int64_t left_in_block = kKvBlockSize - positions[row] % kKvBlockSize;
      const int64_t n = std::min<int64_t>(left_in_block, chunks[s].n - i);
      kv_tasks.push_back({s, row, row + n});
      i += n;
    }
  }

  std::vector<AttentionArgs> attn(chunks.size());
  float* xd = x.data<float>();
  float* lnd = ln.data<float>();
  float* qkvd = qkv.data<float>();
  float* attd = att.data<float>();
  float* deltad = delta.data<float>();
  float* fcd = fc.data<float>();
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const GPT2Layer& w = weights_.layers[l];
    // The previous layer's MLP output joins the residual stream inside the fused norm.
    {
      ProfileRegion region("ln_1");
      if (l == 0) ops::layernorm_rows(xd, w.ln1_w.data<float>(), w.ln1_b.data<float>(), lnd, R, C, c.layer_norm_epsilon);
      else ops::residual_layernorm_rows(xd, deltad, w.ln1_w.data<float>(), w.ln1_b.data<float>(), lnd, R, C,
                                        c.layer_norm_epsilon);
    }
    // No prefetch of the KV lines the writes below will touch (one per head dimension of each new
    // key): issued here, in the calling thread before the qkv product, it made kv_cache_write
    // 38 -> 28 us a layer at 16 sequences, but the other thread waited while it ran (~4,400
    // prefetches a layer). Interleaved steps without it, over several runs: 16 sequences -10% to
    // +2.5% (median -3%), 4 sequences -3% to -11%, 8 sequences -7% to +7%, 1 sequence +1.5%.
    {
      ProfileRegion region("attn.qkv");
      linear_rows(lnd, R, C, w.attn_w, BLayout::KN, w.attn_p, &w.attn_b, false, qkvd, compute_dtype_);
    }
    // Prompt chunks' keys and values go into the cache here; a decoding sequence's one new
    // position is written by the attention kernel (AttentionArgs::new_k), per head, in the thread
    // that then attends that head: no parallel region of its own, and the transposed key's lines
    // (one per head dimension) are fetched once, by the thread that reads them next. Bundled
    // model, 16 decoding sequences: the separate writes took 19-26 us a layer, 4% of a step;
    // interleaved steps against them, 16 sequences 0.5-2.6% faster (4 runs), 2-8 sequences
    // 0.9-1.2%, one sequence level.
    if (!kv_tasks.empty()) {
      // One task per (sequence, KV block) run of rows: blocks are disjoint memory, so tasks never
      // race, and a prefill's positions spread over the threads too (a 512-token prompt wrote its
      // keys on one core: 1.3 ms a layer, 2% of the prefill). The transposed key writes touch a
      // cache line per head dimension.
      ProfileRegion region("attn.kv_write");
      ProfileScope scope("kv_cache_write");
      parallel_for(int64_t(kv_tasks.size()), 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const KvWriteTask& task = kv_tasks[t];
          const float* r = qkvd + task.row0 * 3 * C;  // (a task's rows are consecutive positions)
          chunks[task.chunk].cache->write_rows(int(l), positions[task.row0], task.row1 - task.row0, r + C, r + 2 * C,
                                               3 * C);
        }
      }, 4);
    }
    const float scale = c.attn_scale(l);
    for (size_t s = 0; s < chunks.size(); ++s) {
      AttentionArgs& a = attn[s];
      a.n_head = int(H), a.head_dim = int(hd);
      a.n_query = chunks[s].n, a.first_pos = positions[first_row[s]];
      a.q = qkvd + first_row[s] * 3 * C, a.q_stride = 3 * C;
      a.out = attd + first_row[s] * C, a.out_stride = C;
      a.k_blocks = chunks[s].cache->key_blocks(int(l));
      a.v_blocks = chunks[s].cache->value_blocks(int(l));
      a.kv_bf16 = chunks[s].cache->dtype() == DType::BF16, a.kv_i8 = chunks[s].cache->dtype() == DType::I8;
      a.scale = scale;
      if (chunks[s].n == 1) a.new_k = a.q + C, a.new_v = a.q + 2 * C;
    }
    {
      ProfileRegion region("attn.core");
      ops::paged_attention(attn.data(), int(attn.size()));
    }
    {
      ProfileRegion region("attn.proj");
      linear_rows(attd, R, C, w.attn_proj_w, BLayout::KN, w.attn_proj_p, &w.attn_proj_b, false, deltad, compute_dtype_);
    }
    {
      ProfileRegion region("ln_2");
      ops::residual_layernorm_rows(xd, deltad, w.ln2_w.data<float>(), w.ln2_b.data<float>(), lnd, R, C,
                                   c.layer_norm_epsilon);
    }
    {
      ProfileRegion region("mlp.fc");
      linear_rows(lnd, R, C, w.fc_w, BLayout::KN, w.fc_p, &w.fc_b, true, fcd, compute_dtype_);
    }
    {
      ProfileRegion region("mlp.proj");
      linear_rows(fcd, R, F, w.mlp_proj_w, BLayout::KN, w.mlp_proj_p, &w.mlp_proj_b, false, deltad, compute_dtype_);
    }
  }
  for (auto& ch : chunks) ch.cache->set_length(ch.cache->length() + ch.n);

  // Final norm only on the rows whose logits are wanted, then the tied lm_head (wte is (V, C)).
  Tensor hidden = Tensor::empty({logit_rows, C}, DType::F32);
  Tensor resid = Tensor::empty({logit_rows, C}, DType::F32);
  {
    ProfileRegion region("ln_f");
    int64_t out_row = 0;
    for (size_t s = 0; s < chunks.size(); ++s) {
      int64_t first = chunks[s].all_logits ? 0 : chunks[s].n - 1;
      for (int64_t i = first; i < chunks[s].n; ++i, ++out_row) {
        int64_t row = first_row[s] + i;
        ops::add_into(xd + row * C, deltad + row * C, resid.data<float>() + out_row * C, C);
      }
    }
    ops::layernorm_rows(resid.data<float>(), weights_.lnf_w.data<float>(), weights_.lnf_b.data<float>(),
                        hidden.data<float>(), logit_rows, C, c.layer_norm_epsilon);
  }
  ProfileRegion region("lm_head");
  linear_rows(hidden.data<float>(), logit_rows, C, weights_.wte, BLayout::NK, weights_.lm_head_p, nullptr, false,
              logits, compute_dtype_);
}

Tensor GPT2Model::forward(const int32_t* ids, int64_t batch, int64_t T) {
  LLAMAS_CHECK(batch > 0 && T > 0, "forward", "input must be a non-empty (B, T) array, got (", batch, ", ", T, ")");
  LLAMAS_CHECK(T <= config_.n_positions, "forward", "sequence length ", T, " exceeds the context length ",
               config_.n_positions);
  Tensor logits = Tensor::empty({batch, T, config_.vocab_size}, DType::F32);
  std::vector<std::unique_ptr<KvCache>> caches;
  std::vector<Chunk> chunks;
  for (int64_t b = 0; b < batch; ++b) {
    caches.emplace_back(new KvCache(int(config_.n_layer), int(config_.n_head), int(config_.n_embd / config_.n_head),
                                    config_.n_positions));
    chunks.push_back({caches.back().get(), ids + b * T, T, true});
  }
  run_chunks(chunks, logits.data<float>());
  return logits;
}

std::vector<int32_t> GPT2Model::step(std::vector<StepEntry>& entries) {
  std::vector<Chunk> chunks;
  std::vector<int64_t> first_row(entries.size());  // the entry's first logits row
  struct Target {
    size_t entry;
    int64_t token;  // index into the entry's tokens
    size_t slot;    // index into its sequence's scores
  };
  std::vector<Target> scored;
  std::vector<size_t> n_scored(entries.size(), 0);  // targets >= 0 per entry
  int64_t rows = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const StepEntry& e = entries[i];
    LLAMAS_CHECK(e.seq != nullptr, "step", "entry ", i, " has no sequence");
    LLAMAS_CHECK(!e.tokens.empty(), "step", "entry ", i, " has no tokens");
    for (size_t j = 0; j < i; ++j)
      LLAMAS_CHECK(entries[j].seq != e.seq, "step", "a sequence appears twice in one step");
    LLAMAS_CHECK(!e.verify_drafts || (e.targets.empty() && e.sample), "step", "entry ", i,
                 " verifies drafts: it samples and has no targets");
    const bool all_rows = !e.targets.empty() || e.verify_drafts;
    if (!e.targets.empty()) {
      LLAMAS_CHECK(e.targets.size() == e.tokens.size(), "step", "entry ", i, " has ", e.targets.size(),
                   " targets for ", e.tokens.size(), " tokens (one per token, -1 for none)");
      LLAMAS_CHECK(e.score_top >= 0 && e.score_top <= 20, "step", "score_top must be in [0, 20], got ", e.score_top);
      for (size_t t = 0; t < e.targets.size(); ++t) {
        LLAMAS_CHECK(e.targets[t] >= -1 && e.targets[t] < config_.vocab_size, "step", "target ", e.targets[t],
                     " is outside the vocabulary [0, ", config_.vocab_size, ")");
        if (e.targets[t] >= 0) scored.push_back({i, int64_t(t), n_scored[i]++});
      }
    }
    chunks.push_back({&e.seq->cache, e.tokens.data(), int64_t(e.tokens.size()), all_rows});
    first_row[i] = rows;
    rows += all_rows ? int64_t(e.tokens.size()) : 1;
  }
  Tensor logits = Tensor::empty({rows, config_.vocab_size}, DType::F32);
  run_chunks(chunks, logits.data<float>());
  std::vector<int32_t> out(entries.size(), -1);
  for (size_t i = 0; i < entries.size(); ++i) {
    Sequence& s = *entries[i].seq;
    s.tokens.insert(s.tokens.end(), entries[i].tokens.begin(), entries[i].tokens.end());
    if (entries[i].sample && s.n_prompt < 0) s.n_prompt = int64_t(s.tokens.size());
    if (!entries[i].targets.empty()) s.scores.assign(n_scored[i], TokenScore{});
  }
  ProfileRegion region("sampling");
  ProfileScope scope("sample");
  // Targets first: sampling changes its row's logits in place. Each is a log-softmax over the
  // vocabulary (~50k exps for GPT-2), so the rows are split between the threads.
  if (!scored.empty()) {
    parallel_for(int64_t(scored.size()), 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const Target& target = scored[j];
        const StepEntry& e = entries[target.entry];
        const int32_t token = e.targets[target.token];
        const float* row = logits.data<float>() + (first_row[target.entry] + target.token) * config_.vocab_size;
        const double log_norm = log_normaliser(row, config_.vocab_size, "score");
        e.seq->scores[target.slot] = {token, float(double(row[token]) - log_norm),
                                      top_logprobs(row, config_.vocab_size, e.score_top, log_norm)};
      }
    });
  }
  // Each sequence draws from its own logits row with its own generator, so sequences sample in
  // parallel and the draws do not depend on the split (16 sequences at temperature 0.8 over a
  // 4096-token vocabulary took ~0.8 ms of a ~5 ms step on one core).
  parallel_for(int64_t(entries.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (!entries[i].sample) continue;
      Sequence& s = *entries[i].seq;
      if (entries[i].verify_drafts) {
        const std::vector<int32_t> drafts(entries[i].tokens.begin() + 1, entries[i].tokens.end());
        s.verified = s.sampler.verify(logits.data<float>() + first_row[i] * config_.vocab_size, config_.vocab_size,
                                      drafts, s.tokens, s.n_prompt);
        out[i] = s.verified.back();
        continue;
      }
      const bool all_rows = !entries[i].targets.empty();
      const int64_t last_row = first_row[i] + (all_rows ? int64_t(entries[i].tokens.size()) - 1 : 0);
      out[i] = s.sampler.sample(logits.data<float>() + last_row * config_.vocab_size, config_.vocab_size, s.tokens,
                                s.n_prompt);
    }
  }, 4);
  return out;
}

}  // namespace llamas
