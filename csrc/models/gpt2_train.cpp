#include "models/gpt2_train.h"

#include <cmath>
#include <cstring>

#include "llamas/error.h"
#include "llamas/ops.h"
#include "llamas/parallel.h"
#include "llamas/profiler.h"

namespace llamas {

namespace {

// C (M, N) (+)= A @ B with A (M, K) or, with a_trans, stored (K, M); B float32 in `layout`.
void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, bool a_trans, const float* B,
              BLayout layout, int64_t ldb, const float* bias, float* C, bool accumulate) {
  GemmArgs g;
  g.M = M, g.N = N, g.K = K;
  g.A = A, g.lda = lda, g.a_trans = a_trans;
  g.B = B, g.b_layout = layout, g.ldb = ldb;
  g.bias = bias;
  g.C = C, g.ldc = N;
  g.accumulate = accumulate;
  ops::gemm(g);
}

// Forward y = x @ W + b for a Conv1D weight W (K, N).
void linear_fwd(const float* x, int64_t rows, const Tensor& w, const Tensor& b, float* y) {
  gemm_f32(rows, w.dim(1), w.dim(0), x, w.dim(0), false, w.data<float>(), BLayout::KN, w.dim(1), b.data<float>(), y,
           false);
}

// Backward of y = x @ W + b: dx (+)= dy @ W^T, dW += x^T @ dy, db += column sums of dy.
void linear_bwd(const float* x, const float* dy, int64_t rows, const Tensor& w, Tensor& dw, Tensor& db, float* dx,
                bool dx_accumulate) {
  const int64_t K = w.dim(0), N = w.dim(1);
  if (dx) gemm_f32(rows, K, N, dy, N, false, w.data<float>(), BLayout::NK, N, nullptr, dx, dx_accumulate);
  gemm_f32(K, N, rows, x, K, true, dy, BLayout::KN, N, nullptr, dw.data<float>(), true);
  ops::column_sum(dy, rows, N, db.data<float>());
}

bool finite(double x) { return std::isfinite(x); }

}  // namespace

GPT2Trainer::GPT2Trainer(GPT2Model& model, const OptimizerConfig& options) : model_(model), options_(options) {
  const char* op = "trainer";
  LLAMAS_CHECK(model.dtype() == DType::F32, op, "training needs float32 weights, the model is ",
               dtype_name(model.dtype()), " (load it with dtype=\"float32\")");
  LLAMAS_CHECK(options.beta1 >= 0 && options.beta1 < 1 && options.beta2 >= 0 && options.beta2 < 1, op,
               "betas must be in [0, 1), got (", options.beta1, ", ", options.beta2, ")");
  LLAMAS_CHECK(options.eps > 0 && std::isfinite(options.eps), op, "eps must be positive, got ", options.eps);
  LLAMAS_CHECK(options.weight_decay >= 0 && std::isfinite(options.weight_decay), op,
               "weight_decay must be >= 0, got ", options.weight_decay);
  LLAMAS_CHECK(options.grad_clip >= 0 && std::isfinite(options.grad_clip), op, "grad_clip must be >= 0, got ",
               options.grad_clip);
  GPT2Weights weights = model.weights().unpacked();
  const std::vector<int64_t> offsets = flat_parameter_layout(model.config());
  auto src = named_parameters(weights);
  for (size_t i = 0; i < src.size(); ++i) {
    Param p;
    p.name = src[i].first, p.shape = src[i].second->shape(), p.numel = src[i].second->numel();
    p.offset = offsets[i];
    p.decay = src[i].second->ndim() >= 2;
    params_.push_back(p);
  }
  const int64_t total = offsets.back();
  // Weights made by init_gpt2_weights already live in this layout: adopt them without a copy
  // (a copy would hold two sets of weights at once, 500 MB extra at 124M).
  const bool adopt = weights.flat.defined() && weights.flat.numel() == total;
  flat_ = adopt ? weights.flat : Tensor::zeros({total}, DType::F32);
  grad_ = Tensor::zeros({total}, DType::F32);
  exp_avg_ = Tensor::zeros({total}, DType::F32);
  exp_avg_sq_ = Tensor::zeros({total}, DType::F32);
  GPT2Weights flat_weights = weights;
  flat_weights.flat = flat_;
  grads_ = weights;
  grads_.flat = grad_;
  auto dst = named_parameters(flat_weights);
  auto gv = named_parameters(grads_);
  for (size_t i = 0; i < params_.size(); ++i) {
    const Param& p = params_[i];
    if (!adopt) std::memcpy(flat_.data<float>() + p.offset, src[i].second->data<float>(), p.numel * sizeof(float));
    *dst[i].second = flat_.slice(p.offset, p.shape);
    *gv[i].second = grad_.slice(p.offset, p.shape);
  }
  weights = GPT2Weights();  // drop our references to the originals before the model swaps
  model_.set_weights(std::move(flat_weights));
}

Tensor& GPT2Trainer::buffer(const std::string& kind) {
  if (kind == "param") return flat_;
  if (kind == "grad") return grad_;
  if (kind == "exp_avg") return exp_avg_;
  if (kind == "exp_avg_sq") return exp_avg_sq_;
  fail("trainer", "unknown buffer '", kind, "' (param, grad, exp_avg, exp_avg_sq)");
}

int64_t GPT2Trainer::check_batch(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T,
                                 const char* op) const {
  const GPT2Config& c = model_.config();
  LLAMAS_CHECK(B > 0 && T > 0, op, "the batch must be a non-empty (B, T) array, got (", B, ", ", T, ")");
  LLAMAS_CHECK(T <= c.n_positions, op, "sequence length ", T, " exceeds the context length ", c.n_positions);
  for (int64_t i = 0; i < B * T; ++i) {
    LLAMAS_CHECK(inputs[i] >= 0 && inputs[i] < c.vocab_size, op, "input token ", inputs[i], " at (", i / T, ", ",
                 i % T, ") is out of the vocabulary [0, ", c.vocab_size, ")");
    LLAMAS_CHECK(ops::valid_target(targets[i], c.vocab_size), op, "target ", targets[i], " at (", i / T, ", ",
                 i % T, ") is out of the vocabulary [0, ", c.vocab_size, ") and not ", ops::kIgnoreTarget, " (ignored)");
  }
  int64_t learned = 0;
  for (int64_t i = 0; i < B * T; ++i) learned += targets[i] != ops::kIgnoreTarget;
  LLAMAS_CHECK(learned > 0, op, "every target is ", ops::kIgnoreTarget, " (ignored): the batch has nothing to learn from");
  return learned;
}

double GPT2Trainer::run(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T, float grad_scale) {
  const GPT2Config& c = model_.config();
  const GPT2Weights& w = model_.weights();
  const int64_t C = c.n_embd, F = c.ffn(), H = c.n_head, hd = C / H, V = c.vocab_size, L = c.n_layer;
  const int64_t R = B * T;
  const float eps = c.layer_norm_epsilon;
  auto buf = [](std::vector<int64_t> shape) { return Tensor::empty(shape, DType::F32); };

  // Saved activations, per layer: the residual stream entering the layer (x_in) and after the
  // attention block (x_mid), both layernorm outputs, qkv, the attention output and its
  // log-sum-exp, and the MLP hidden layer before and after GELU.
  struct Saved {
    Tensor x_in, ln1, qkv, att, lse, x_mid, ln2, fc_pre, fc_act;
  };
  std::vector<Saved> s(L);
  std::vector<int64_t> positions(R);
  for (int64_t i = 0; i < R; ++i) positions[i] = i % T;
  Tensor x = buf({R, C});
  {
    ProfileRegion region("embedding");
    ops::embedding(inputs, positions.data(), R, w.wte, w.wpe, x.data<float>());
  }
  Tensor delta = buf({R, C});
  for (int64_t l = 0; l < L; ++l) {
    const GPT2Layer& lw = w.layers[l];
    Saved& a = s[l];
    a.x_in = x;
    a.ln1 = buf({R, C}), a.qkv = buf({R, 3 * C}), a.att = buf({R, C}), a.lse = buf({B * H * T});
    a.x_mid = buf({R, C}), a.ln2 = buf({R, C}), a.fc_pre = buf({R, F});
    {
      ProfileRegion region("ln_1");
      ops::layernorm_rows(a.x_in.data<float>(), lw.ln1_w.data<float>(), lw.ln1_b.data<float>(), a.ln1.data<float>(), R,
                          C, eps);
    }
    {
      ProfileRegion region("attn.qkv");
      linear_fwd(a.ln1.data<float>(), R, lw.attn_w, lw.attn_b, a.qkv.data<float>());
    }
    {
      ProfileRegion region("attn.core");
      ops::attention_forward(a.qkv.data<float>(), a.att.data<float>(), a.lse.data<float>(), B, T, H, hd,
                             c.attn_scale(l));
    }
    {
      ProfileRegion region("attn.proj");
      linear_fwd(a.att.data<float>(), R, lw.attn_proj_w, lw.attn_proj_b, delta.data<float>());
      ops::add_into(a.x_in.data<float>(), delta.data<float>(), a.x_mid.data<float>(), R * C);
    }
    {
      ProfileRegion region("ln_2");
      ops::layernorm_rows(a.x_mid.data<float>(), lw.ln2_w.data<float>(), lw.ln2_b.data<float>(), a.ln2.data<float>(), R,
                          C, eps);
    }
    {
      ProfileRegion region("mlp.fc");
      linear_fwd(a.ln2.data<float>(), R, lw.fc_w, lw.fc_b, a.fc_pre.data<float>());
      a.fc_act = ops::gelu(a.fc_pre);
    }
    {
      ProfileRegion region("mlp.proj");
      linear_fwd(a.fc_act.data<float>(), R, lw.mlp_proj_w, lw.mlp_proj_b, delta.data<float>());
      x = buf({R, C});
      ops::add_into(a.x_mid.data<float>(), delta.data<float>(), x.data<float>(), R * C);
    }
  }
  Tensor lnf = buf({R, C});
  {
    ProfileRegion region("ln_f");
    ops::layernorm_rows(x.data<float>(), w.lnf_w.data<float>(), w.lnf_b.data<float>(), lnf.data<float>(), R, C, eps);
  }
  // logits = lnf @ wte^T; the classifier turns them into dlogits in place.
  Tensor logits = buf({R, V});
  {
    ProfileRegion region("lm_head");
    gemm_f32(R, V, C, lnf.data<float>(), C, false, w.wte.data<float>(), BLayout::NK, C, nullptr, logits.data<float>(),
             false);
  }
  std::vector<float> losses(R);
  {
    ProfileRegion region("loss");
    ops::cross_entropy(logits.data<float>(), targets, losses.data(), R, V, grad_scale);
  }
  double loss_sum = 0;
  for (float v : losses) loss_sum += v;

  GPT2Weights& g = grads_;
  // Classifier: dlnf = dlogits @ wte; dwte += dlogits^T @ lnf.
  Tensor d_ln = buf({R, C});
  {
    ProfileRegion region("lm_head backward");
    gemm_f32(R, C, V, logits.data<float>(), V, false, w.wte.data<float>(), BLayout::KN, C, nullptr, d_ln.data<float>(),
             false);
    gemm_f32(V, C, R, logits.data<float>(), V, true, lnf.data<float>(), BLayout::KN, C, nullptr, g.wte.data<float>(),
             true);
  }
  logits = Tensor();
  Tensor d_res = Tensor::zeros({R, C}, DType::F32);
  {
    ProfileRegion region("ln_f backward");
    ops::layernorm_backward(d_ln.data<float>(), x.data<float>(), w.lnf_w.data<float>(), d_res.data<float>(),
                            g.lnf_w.data<float>(), g.lnf_b.data<float>(), R, C, eps);
  }
  Tensor d_big = buf({R, F}), d_att = buf({R, C}), d_qkv = buf({R, 3 * C});
  for (int64_t l = L - 1; l >= 0; --l) {
    const GPT2Layer& lw = w.layers[l];
    GPT2Layer& lg = g.layers[l];
    Saved& a = s[l];
    // MLP: x_out = x_mid + gelu(ln2 @ fc_w + fc_b) @ proj_w + proj_b.
    {
      ProfileRegion region("mlp.proj backward");
      linear_bwd(a.fc_act.data<float>(), d_res.data<float>(), R, lw.mlp_proj_w, lg.mlp_proj_w, lg.mlp_proj_b,
                 d_big.data<float>(), false);
    }
    {
      ProfileRegion region("mlp.fc backward");
      ops::gelu_backward(a.fc_pre.data<float>(), d_big.data<float>(), d_big.data<float>(), R * F);
      linear_bwd(a.ln2.data<float>(), d_big.data<float>(), R, lw.fc_w, lg.fc_w, lg.fc_b, d_ln.data<float>(), false);
    }
    {
      ProfileRegion region("ln_2 backward");
      ops::layernorm_backward(d_ln.data<float>(), a.x_mid.data<float>(), lw.ln2_w.data<float>(), d_res.data<float>(),
                              lg.ln2_w.data<float>(), lg.ln2_b.data<float>(), R, C, eps);
    }
    // Attention: x_mid = x_in + attention(ln1 @ attn_w + attn_b) @ proj_w + proj_b.
    {
      ProfileRegion region("attn.proj backward");
      linear_bwd(a.att.data<float>(), d_res.data<float>(), R, lw.attn_proj_w, lg.attn_proj_w, lg.attn_proj_b,
                 d_att.data<float>(), false);
    }
    {
      ProfileRegion region("attn.core backward");
      ops::attention_backward(a.qkv.data<float>(), a.att.data<float>(), a.lse.data<float>(), d_att.data<float>(),
                              d_qkv.data<float>(), B, T, H, hd, c.attn_scale(l));
    }
    {
      ProfileRegion region("attn.qkv backward");
      linear_bwd(a.ln1.data<float>(), d_qkv.data<float>(), R, lw.attn_w, lg.attn_w, lg.attn_b, d_ln.data<float>(),
                 false);
    }
    {
      ProfileRegion region("ln_1 backward");
      ops::layernorm_backward(d_ln.data<float>(), a.x_in.data<float>(), lw.ln1_w.data<float>(), d_res.data<float>(),
                              lg.ln1_w.data<float>(), lg.ln1_b.data<float>(), R, C, eps);
    }
    s[l] = Saved();  // give the layer's activations back to the allocator as soon as they are used
  }
  {
    ProfileRegion region("embedding backward");
    ops::embedding_backward(inputs, positions.data(), R, d_res.data<float>(), g.wte.data<float>(), g.wpe.data<float>(),
                            C);
  }
  return loss_sum;
}

double GPT2Trainer::compute_gradients(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T) {
  const int64_t learned = check_batch(inputs, targets, B, T, "compute_gradients");
  std::memset(grad_.raw(), 0, grad_.nbytes());
  return run(inputs, targets, B, T, 1.0f / float(learned)) / double(learned);
}

StepResult GPT2Trainer::step(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T,
                             int64_t micro_batch, float lr) {
  const char* op = "train_step";
  const int64_t learned = check_batch(inputs, targets, B, T, op);
  LLAMAS_CHECK(micro_batch > 0, op, "micro_batch must be positive, got ", micro_batch);
  LLAMAS_CHECK(lr >= 0 && std::isfinite(lr), op, "learning rate must be finite and >= 0, got ", lr);
  const int64_t step_number = steps_done_ + 1;
  std::memset(grad_.raw(), 0, grad_.nbytes());
  StepResult result;
  // Every micro-batch's gradient is scaled by 1 / (the step's targets learned from), so the
  // accumulated gradient is that of the step's mean loss whatever the split.
  const float grad_scale = 1.0f / float(learned);
  for (int64_t b0 = 0; b0 < B; b0 += micro_batch) {
    const int64_t mb = std::min(micro_batch, B - b0);
    result.loss += run(inputs + b0 * T, targets + b0 * T, mb, T, grad_scale);
  }
  result.loss /= double(learned);
  LLAMAS_CHECK(finite(result.loss), op, "loss is ", result.loss, " at step ", step_number,
               "; the weights were not updated (lower the learning rate, or check the data)");
  ProfileRegion region("optimizer");  // the gradient norm, clipping and AdamW
  result.grad_norm = std::sqrt(ops::sum_squares(grad_.data<float>(), grad_.numel()));
  LLAMAS_CHECK(finite(result.grad_norm), op, "gradient norm is ", result.grad_norm, " at step ", step_number,
               "; the weights were not updated (lower the learning rate, or check the data)");
  AdamWArgs args;
  args.lr = lr;
  args.beta1 = options_.beta1, args.beta2 = options_.beta2, args.eps = options_.eps;
  // As torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1.
  args.grad_scale = 1.0f;
  if (options_.grad_clip > 0) {
    double coef = double(options_.grad_clip) / (result.grad_norm + 1e-6);
    if (coef < 1.0) args.grad_scale = float(coef);
  }
  args.bias_correction1 = float(1.0 - std::pow(double(options_.beta1), double(step_number)));
  args.bias_correction2 = float(1.0 - std::pow(double(options_.beta2), double(step_number)));
  for (const Param& p : params_) {
    args.weight_decay = p.decay ? options_.weight_decay : 0.0f;
    ops::adamw(flat_.data<float>() + p.offset, grad_.data<float>() + p.offset, exp_avg_.data<float>() + p.offset,
               exp_avg_sq_.data<float>() + p.offset, p.numel, args);
  }
  steps_done_ = step_number;
  return result;
}

}  // namespace llamas
