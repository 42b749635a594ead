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

float GPT2Config::attn_scale(int64_t layer) const {
  float scale = scale_attn_weights ? 1.0f / std::sqrt(float(n_embd / n_head)) : 1.0f;
  return scale_attn_by_inverse_layer_idx ? scale / float(layer + 1) : scale;
}

size_t GPT2Weights::bytes() const {
  size_t total = wpe.nbytes() + lnf_w.nbytes() + lnf_b.nbytes() + (packed() ? lm_head_p.data.nbytes() : wte.nbytes());
  for (auto& l : layers) {
    for (const Tensor* t : {&l.ln1_w, &l.ln1_b, &l.attn_b, &l.attn_proj_b, &l.ln2_w, &l.ln2_b, &l.fc_b, &l.mlp_proj_b})
      total += t->nbytes();
    if (packed())
      for (const ops::PackedMatrix* p : l.panels()) total += p->data.nbytes();
    else
      total += l.attn_w.nbytes() + l.attn_proj_w.nbytes() + l.fc_w.nbytes() + l.mlp_proj_w.nbytes();
  }
  return total;
}

GPT2Weights GPT2Weights::unpacked() const {
  GPT2Weights w = *this;
  w.lm_head_p = ops::PackedMatrix();
  for (auto& l : w.layers)
    for (ops::PackedMatrix* p : l.panels()) *p = ops::PackedMatrix();
  w.dtype = wte.dtype();
  return w;
}

namespace {

// The checkpoint's files: one model.safetensors, or the shards of a model.safetensors.index.json
// (transformers splits checkpoints over 5 GB: GPT-2 XL in float32 is two). A tensor is read from
// whichever file holds it.
class WeightReader {
 public:
  explicit WeightReader(const std::vector<std::string>& paths) {
    LLAMAS_CHECK(!paths.empty(), "load", "no weight files given");
    files_.reserve(paths.size());
    for (const std::string& p : paths) files_.emplace_back(p);
    // Real GPT-2 checkpoints name tensors "h.0.attn..."; GPT2LMHeadModel.save_pretrained writes
    // "transformer.h.0.attn...". Accept either.
    prefix_ = find("transformer.wte.weight") ? "transformer." : "";
  }

  bool holds(const std::string& name) const { return find(prefix_ + name) != nullptr; }

  // As stored (a view of the mapping), checked against the config's shape.
  Tensor get(const std::string& name, const std::vector<int64_t>& shape) {
    std::string full = prefix_ + name;
    const SafetensorsFile* file = find(full);
    if (!file)
      fail("load", where(), ": tensor '", full, "' is missing (is this a GPT-2 checkpoint?)");
    Tensor t = file->get(full);
    if (t.shape() != shape) {
      std::string expected = Tensor::empty(shape, DType::F32).describe();
      fail("load", file->path(), ": tensor '", full, "' has shape ", t.describe(), " but the config needs ",
           expected.substr(expected.find('[')));
    }
    return t;
  }
  Tensor get(const std::string& name, const std::vector<int64_t>& shape, DType dtype) {
    return ops::cast(get(name, shape), dtype);
  }
  // Packs a matrix, then drops the mapping's pages packing touched (when t is a view of it; they
  // read the file again if touched): without this they would stay resident beside the panels
  // (RSS twice the weights at 124M while loading, ~950 MB).
  ops::PackedMatrix pack(const Tensor& t, BLayout layout, DType dtype, const std::string& name) {
    ops::PackedMatrix p;
    try {
      p = ops::pack_panels(t, layout, dtype);
    } catch (const Error& e) {  // (int8 quantization refuses non-finite weights): name the tensor
      fail("load", where(), ": tensor '", prefix_ + name, "': ", e.what());
    }
    for (const SafetensorsFile& f : files_) f.release_pages(t.raw(), t.nbytes());  // (only its own file's)
    return p;
  }

 private:
  // The file that holds the tensor; two that hold it are refused (which one the index meant is
  // not for the loader to guess: taking the first loaded another copy's weights without a word).
  const SafetensorsFile* find(const std::string& name) const {
    const SafetensorsFile* found = nullptr;
    for (const SafetensorsFile& f : files_) {
      if (!f.contains(name)) continue;
      if (found) fail("load", "tensor '", name, "' is in both ", found->path(), " and ", f.path());
      found = &f;
    }
    return found;
  }
  std::string where() const {
    return files_.size() == 1 ? files_[0].path() : files_[0].path() + " (and " + std::to_string(files_.size() - 1) +
                                                       " other shards)";
  }

  std::vector<SafetensorsFile> files_;
  std::string prefix_;
};

}  // namespace

GPT2Weights load_gpt2_weights(const std::vector<std::string>& paths, const GPT2Config& c, DType dtype) {
  c.validate();
  LLAMAS_CHECK(dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::I8, "load",
               "dtype must be float32, bfloat16 or int8");
  WeightReader r(paths);
  // A checkpoint with more layers than the config names is another model (n_layer edited, or the
  // wrong config.json): loading its first layers would run silently wrong.
  if (r.holds("h." + std::to_string(c.n_layer) + ".ln_1.weight"))
    fail("load", "the checkpoint has a layer ", c.n_layer, " but config.json's n_layer is ", c.n_layer,
         " (layers 0..", c.n_layer - 1, "): the config does not describe these weights");
  const int64_t C = c.n_embd, F = c.ffn();
  const DType f32 = DType::F32;
  // The stored matrices: float32 for a float32 model (what training and saving read), as stored
  // (no copy) for a bfloat16 or int8 one, whose forward pass reads only its panels.
  auto matrix = [&](const std::string& name, const std::vector<int64_t>& shape) {
    return dtype == f32 ? r.get(name, shape, f32) : r.get(name, shape);
  };
  // The vectors and wpe, copied out of the mapping (~3 MB at 124M; the matrices are packed), so
  // the forward pass reads no page of the file: a checkpoint cut short on disk while a model ran
  // (cp over it truncates first) killed the process with SIGBUS. (Model.save and training read
  // the stored matrices, views of the mapping, again.)
  auto vec = [&](const std::string& name, const std::vector<int64_t>& shape) {
    Tensor t = r.get(name, shape, f32);
    Tensor own = Tensor::empty(t.shape(), f32);
    std::memcpy(own.raw(), t.raw(), t.nbytes());
    return own;
  };
  GPT2Weights w;
  w.dtype = dtype;
  w.wte = matrix("wte.weight", {c.vocab_size, C});
  w.lm_head_p = r.pack(w.wte, BLayout::NK, dtype, "wte.weight");
  w.wpe = vec("wpe.weight", {c.n_positions, C});
  w.lnf_w = vec("ln_f.weight", {C});
  w.lnf_b = vec("ln_f.bias", {C});
  for (int64_t i = 0; i < c.n_layer; ++i) {
    std::string p = "h." + std::to_string(i) + ".";
    GPT2Layer l;
    l.ln1_w = vec(p + "ln_1.weight", {C});
    l.ln1_b = vec(p + "ln_1.bias", {C});
    l.attn_w = matrix(p + "attn.c_attn.weight", {C, 3 * C});
    l.attn_b = vec(p + "attn.c_attn.bias", {3 * C});
    l.attn_proj_w = matrix(p + "attn.c_proj.weight", {C, C});
    l.attn_proj_b = vec(p + "attn.c_proj.bias", {C});
    l.ln2_w = vec(p + "ln_2.weight", {C});
    l.ln2_b = vec(p + "ln_2.bias", {C});
    l.fc_w = matrix(p + "mlp.c_fc.weight", {C, F});
    l.fc_b = vec(p + "mlp.c_fc.bias", {F});
    l.mlp_proj_w = matrix(p + "mlp.c_proj.weight", {F, C});
    l.mlp_proj_b = vec(p + "mlp.c_proj.bias", {C});
    l.attn_p = r.pack(l.attn_w, BLayout::KN, dtype, p + "attn.c_attn.weight");
    l.attn_proj_p = r.pack(l.attn_proj_w, BLayout::KN, dtype, p + "attn.c_proj.weight");
    l.fc_p = r.pack(l.fc_w, BLayout::KN, dtype, p + "mlp.c_fc.weight");
    l.mlp_proj_p = r.pack(l.mlp_proj_w, BLayout::KN, dtype, p + "mlp.c_proj.weight");
    w.layers.push_back(std::move(l));
  }
  return w;
}

}  // namespace llamas
