#include <algorithm>
#include <cmath>
#include <cstring>

#include "llamas/error.h"
#include "llamas/ops.h"
#include "llamas/parallel.h"
#include "models/gpt2.h"
#include "runtime/safetensors.h"

namespace llamas {

void GPT2Config::validate() const {
  const char* op = "gpt2_config";
  LLAMAS_CHECK(vocab_size > 0 && vocab_size < (int64_t(1) << 31), op, "vocab_size must be positive, got ", vocab_size);
  LLAMAS_CHECK(n_positions > 0, op, "n_positions must be positive, got ", n_positions);
  LLAMAS_CHECK(n_embd > 0 && n_layer > 0 && n_head > 0, op, "n_embd, n_layer and n_head must be positive, got ",
               n_embd, ", ", n_layer, ", ", n_head);
  LLAMAS_CHECK(n_embd % n_head == 0, op, "n_embd (", n_embd, ") must be divisible by n_head (", n_head, ")");
  LLAMAS_CHECK(n_embd / n_head <= 256, op, "head size ", n_embd / n_head, " exceeds the supported 256");
  LLAMAS_CHECK(n_inner >= 0, op, "n_inner must be >= 0, got ", n_inner);
  LLAMAS_CHECK(layer_norm_epsilon > 0 && std::isfinite(layer_norm_epsilon), op,
               "layer_norm_epsilon must be positive, got ", layer_norm_epsilon);
}

size_t GPT2Weights::bytes() const {
  size_t total = wte.nbytes() + (lm_head_kn.defined() ? lm_head_kn.nbytes() : 0) + wpe.nbytes() + lnf_w.nbytes() + lnf_b.nbytes();
  for (auto& l : layers)
    for (const Tensor* t : {&l.ln1_w, &l.ln1_b, &l.attn_w, &l.attn_b, &l.attn_proj_w, &l.attn_proj_b, &l.ln2_w,
                            &l.ln2_b, &l.fc_w, &l.fc_b, &l.mlp_proj_w, &l.mlp_proj_b})
      total += t->nbytes();
  return total;
}

namespace {

class WeightReader {
 public:
  WeightReader(const std::string& path) : file_(path) {
    // Real GPT-2 checkpoints name tensors "h.0.attn..."; GPT2LMHeadModel.save_pretrained writes
    // "transformer.h.0.attn...". Accept either.
    prefix_ = file_.contains("transformer.wte.weight") ? "transformer." : "";
  }

  Tensor get(const std::string& name, const std::vector<int64_t>& shape, DType dtype) {
    std::string full = prefix_ + name;
    if (!file_.contains(full))
      fail("load", file_.path(), ": tensor '", full, "' is missing (is this a GPT-2 checkpoint?)");
    Tensor t = file_.get(full);
    if (t.shape() != shape) {
      std::string expected = Tensor::empty(shape, DType::F32).describe();
      fail("load", file_.path(), ": tensor '", full, "' has shape ", t.describe(), " but the config needs ",
           expected.substr(expected.find('[')));
    }
    return ops::cast(t, dtype);
  }

 private:
  SafetensorsFile file_;
  std::string prefix_;
};

}  // namespace

GPT2Weights load_gpt2_weights(const std::string& path, const GPT2Config& c, DType dtype) {
  c.validate();
  LLAMAS_CHECK(dtype == DType::F32 || dtype == DType::BF16, "load", "dtype must be float32 or bfloat16");
  WeightReader r(path);
  const int64_t C = c.n_embd, F = c.ffn();
  const DType f32 = DType::F32;
  GPT2Weights w;
  w.wte = r.get("wte.weight", {c.vocab_size, C}, dtype);
  if (dtype == DType::BF16) {
    const int64_t V = c.vocab_size;
    w.lm_head_kn = Tensor::empty({C, V}, DType::BF16);
    const uint16_t* src = w.wte.data<uint16_t>();
    uint16_t* dst = w.lm_head_kn.data<uint16_t>();
    constexpr int64_t kTile = 64;  // transpose in 64x64 tiles to stay in cache
    parallel_for((V + kTile - 1) / kTile, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t v0 = t0 * kTile; v0 < std::min(V, t1 * kTile); v0 += kTile)
        for (int64_t c0 = 0; c0 < C; c0 += kTile)
          for (int64_t v = v0; v < std::min(V, v0 + kTile); ++v)
            for (int64_t cc = c0; cc < std::min(C, c0 + kTile); ++cc) dst[cc * V + v] = src[v * C + cc];
    });
  }
  w.wpe = r.get("wpe.weight", {c.n_positions, C}, f32);
  w.lnf_w = r.get("ln_f.weight", {C}, f32);
  w.lnf_b = r.get("ln_f.bias", {C}, f32);
  for (int64_t i = 0; i < c.n_layer; ++i) {
    std::string p = "h." + std::to_string(i) + ".";
    GPT2Layer l;
    l.ln1_w = r.get(p + "ln_1.weight", {C}, f32);
    l.ln1_b = r.get(p + "ln_1.bias", {C}, f32);
    l.attn_w = r.get(p + "attn.c_attn.weight", {C, 3 * C}, dtype);
    l.attn_b = r.get(p + "attn.c_attn.bias", {3 * C}, f32);
    l.attn_proj_w = r.get(p + "attn.c_proj.weight", {C, C}, dtype);
    l.attn_proj_b = r.get(p + "attn.c_proj.bias", {C}, f32);
    l.ln2_w = r.get(p + "ln_2.weight", {C}, f32);
    l.ln2_b = r.get(p + "ln_2.bias", {C}, f32);
    l.fc_w = r.get(p + "mlp.c_fc.weight", {C, F}, dtype);
    l.fc_b = r.get(p + "mlp.c_fc.bias", {F}, f32);
    l.mlp_proj_w = r.get(p + "mlp.c_proj.weight", {F, C}, dtype);
    l.mlp_proj_b = r.get(p + "mlp.c_proj.bias", {C}, f32);
    w.layers.push_back(std::move(l));
  }
  return w;
}

}  // namespace llamas
