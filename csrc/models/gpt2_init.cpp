// GPT-2 parameter names (Hugging Face layout) and from-scratch initialisation.
#include <cmath>
#include <cstring>

#include "llamas/error.h"
#include "llamas/parallel.h"
#include "models/gpt2_train.h"

namespace llamas {

std::vector<std::pair<std::string, Tensor*>> named_parameters(GPT2Weights& w) {
  std::vector<std::pair<std::string, Tensor*>> out;
  out.push_back({"transformer.wte.weight", &w.wte});
  out.push_back({"transformer.wpe.weight", &w.wpe});
  for (size_t i = 0; i < w.layers.size(); ++i) {
    GPT2Layer& l = w.layers[i];
    const std::string p = "transformer.h." + std::to_string(i) + ".";
    out.push_back({p + "ln_1.weight", &l.ln1_w});
    out.push_back({p + "ln_1.bias", &l.ln1_b});
    out.push_back({p + "attn.c_attn.weight", &l.attn_w});
    out.push_back({p + "attn.c_attn.bias", &l.attn_b});
    out.push_back({p + "attn.c_proj.weight", &l.attn_proj_w});
    out.push_back({p + "attn.c_proj.bias", &l.attn_proj_b});
    out.push_back({p + "ln_2.weight", &l.ln2_w});
    out.push_back({p + "ln_2.bias", &l.ln2_b});
    out.push_back({p + "mlp.c_fc.weight", &l.fc_w});
    out.push_back({p + "mlp.c_fc.bias", &l.fc_b});
    out.push_back({p + "mlp.c_proj.weight", &l.mlp_proj_w});
    out.push_back({p + "mlp.c_proj.bias", &l.mlp_proj_b});
  }
  out.push_back({"transformer.ln_f.weight", &w.lnf_w});
  out.push_back({"transformer.ln_f.bias", &w.lnf_b});
  return out;
}

namespace {

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Fills x[0:n] with normal(0, std) from a stream keyed by (seed, tensor, chunk): Box-Muller on
// 53-bit uniforms. Chunks of 64 Ki values make the fill parallel and still independent of the
// thread count.
void fill_normal(float* x, int64_t n, float std, uint64_t seed, uint64_t tensor_index) {
  constexpr int64_t kChunk = 1 << 16;
  parallel_for((n + kChunk - 1) / kChunk, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      uint64_t state = seed ^ (tensor_index * 0xD1B54A32D192ED03ull) ^ (uint64_t(c) * 0x8CB92BA72F3D8DD7ull);
      splitmix64(state);
      const int64_t end = std::min(n, (c + 1) * kChunk);
      for (int64_t i = c * kChunk; i < end; i += 2) {
        double u1 = (double(splitmix64(state) >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]
        double u2 = double(splitmix64(state) >> 11) * 0x1.0p-53;
        double r = std::sqrt(-2.0 * std::log(u1));
        x[i] = float(std * r * std::cos(2.0 * M_PI * u2));
        if (i + 1 < end) x[i + 1] = float(std * r * std::sin(2.0 * M_PI * u2));
      }
    }
  });
}

void fill_value(Tensor& t, float value) {
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = value;
}

// Parameter shapes in named_parameters() order.
std::vector<std::vector<int64_t>> parameter_shapes(const GPT2Config& c) {
  const int64_t C = c.n_embd, F = c.ffn();
  std::vector<std::vector<int64_t>> shapes = {{c.vocab_size, C}, {c.n_positions, C}};
  for (int64_t i = 0; i < c.n_layer; ++i) {
    std::vector<std::vector<int64_t>> layer = {{C}, {C}, {C, 3 * C}, {3 * C}, {C, C}, {C}, {C}, {C}, {C, F}, {F}, {F, C}, {C}};
    shapes.insert(shapes.end(), layer.begin(), layer.end());
  }
  shapes.push_back({C});
  shapes.push_back({C});
  return shapes;
}

}  // namespace

std::vector<int64_t> flat_parameter_layout(const GPT2Config& c) {
  constexpr int64_t kAlignFloats = 16;
  std::vector<int64_t> offsets = {0};
  for (auto& shape : parameter_shapes(c)) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    offsets.push_back(offsets.back() + (n + kAlignFloats - 1) / kAlignFloats * kAlignFloats);
  }
  return offsets;
}

GPT2Weights init_gpt2_weights(const GPT2Config& c, uint64_t seed) {
  c.validate();
  // Every parameter is a view of one flat buffer, in the trainer's layout.
  GPT2Weights w;
  w.layers.resize(c.n_layer);
  const std::vector<int64_t> offsets = flat_parameter_layout(c);
  const std::vector<std::vector<int64_t>> shapes = parameter_shapes(c);
  w.flat = Tensor::zeros({offsets.back()}, DType::F32);
  auto params = named_parameters(w);
  for (size_t i = 0; i < params.size(); ++i) *params[i].second = w.flat.slice(offsets[i], shapes[i]);
  const float std_dev = 0.02f, proj_std = 0.02f / std::sqrt(2.0f * float(c.n_layer));
  uint64_t index = 0;
  for (auto& param : params) {
    const std::string& name = param.first;  // (a lambda capturing a structured binding is C++20)
    Tensor* t = param.second;
    ++index;
    auto ends_with = [&](const char* s) {
      size_t n = std::strlen(s);
      return name.size() >= n && name.compare(name.size() - n, n, s) == 0;
    };
    if (t->ndim() == 2) fill_normal(t->data<float>(), t->numel(), ends_with("c_proj.weight") ? proj_std : std_dev,
                                    seed, index);
    else if (ends_with(".bias")) fill_value(*t, 0.0f);
    else fill_value(*t, 1.0f);  // layernorm gains
  }
  return w;
}

}  // namespace llamas
