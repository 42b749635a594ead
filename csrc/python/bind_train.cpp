// llamas._C.GPT2Trainer, model creation and weight export, and the training kernels on numpy
// arrays (llamas._C.ops.*_backward, for tests).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>

#include "cpu/reference.h"
#include "llamas/error.h"
#include "llamas/ops.h"
#include "models/gpt2_train.h"
#include "python/convert.h"
#include "python/gil.h"

namespace llamas {
namespace python {

namespace {

// A numpy view of t (float32 as float32, bfloat16 as uint16 bits) that keeps `owner` alive.
py::array tensor_view(const Tensor& t, py::handle owner) {
  std::vector<py::ssize_t> shape(t.shape().begin(), t.shape().end());
  if (t.dtype() == DType::BF16) return py::array_t<uint16_t>(shape, t.data<uint16_t>(), owner);
  LLAMAS_CHECK(t.dtype() == DType::F32, "weights", "unexpected dtype ", t.describe());
  return py::array_t<float>(shape, t.data<float>(), owner);
}

void check_batch_arrays(const IntArray& inputs, const IntArray& targets, const char* op) {
  LLAMAS_CHECK(inputs.ndim() == 2, op, "inputs must be a 2-D (B, T) integer array, got ", inputs.ndim(), " dims");
  LLAMAS_CHECK(targets.ndim() == 2 && targets.shape(0) == inputs.shape(0) && targets.shape(1) == inputs.shape(1), op,
               "targets must have the shape of inputs (", inputs.shape(0), ", ", inputs.shape(1), ")");
}

FloatArray new_array(std::vector<py::ssize_t> shape) { return FloatArray(shape); }

// The fast kernels (ops::) and their plain references (cpu::reference::) share signatures, so one
// binding serves both under two names.
using LayernormBackwardFn = void (*)(const float*, const float*, const float*, float*, float*, float*, int64_t,
                                     int64_t, float);
using GeluBackwardFn = void (*)(const float*, const float*, float*, int64_t);
using CrossEntropyFn = void (*)(float*, const int32_t*, float*, int64_t, int64_t, float);
using AdamWFn = void (*)(float*, const float*, float*, float*, int64_t, const AdamWArgs&);

void def_layernorm_backward(py::module_& ops, const char* name, LayernormBackwardFn fn) {
  ops.def(name, [fn, name](FloatArray dout, FloatArray x, FloatArray w, float eps) {
    LLAMAS_CHECK(x.ndim() == 2 && dout.ndim() == 2 && dout.shape(0) == x.shape(0) && dout.shape(1) == x.shape(1) &&
                     w.ndim() == 1 && w.shape(0) == x.shape(1),
                 name, "expects dout and x (rows, C) and w (C)");
    int64_t R = x.shape(0), C = x.shape(1);
    FloatArray dx = new_array({R, C}), dw = new_array({C}), db = new_array({C});
    std::memset(dx.mutable_data(), 0, R * C * 4), std::memset(dw.mutable_data(), 0, C * 4);
    std::memset(db.mutable_data(), 0, C * 4);
    fn(dout.data(), x.data(), w.data(), dx.mutable_data(), dw.mutable_data(), db.mutable_data(), R, C, eps);
    return py::make_tuple(dx, dw, db);
  }, py::arg("dout"), py::arg("x"), py::arg("w"), py::arg("eps") = 1e-5f);
}

void def_gelu_backward(py::module_& ops, const char* name, GeluBackwardFn fn) {
  ops.def(name, [fn, name](FloatArray x, FloatArray dy) {
    LLAMAS_CHECK(x.size() == dy.size(), name, "x and dy differ in size");
    FloatArray dx = new_array(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    fn(x.data(), dy.data(), dx.mutable_data(), x.size());
    return dx;
  });
}

void def_cross_entropy(py::module_& ops, const char* name, CrossEntropyFn fn) {
  ops.def(name, [fn, name](FloatArray logits, IntArray targets, float grad_scale) {
    LLAMAS_CHECK(logits.ndim() == 2 && targets.ndim() == 1 && targets.shape(0) == logits.shape(0), name,
                 "expects logits (rows, V) and targets (rows)");
    ops::check_targets(targets.data(), targets.size(), logits.shape(1));  // (the reference too)
    FloatArray z = new_array({logits.shape(0), logits.shape(1)});
    std::memcpy(z.mutable_data(), logits.data(), logits.size() * 4);
    FloatArray losses = new_array({logits.shape(0)});
    fn(z.mutable_data(), targets.data(), losses.mutable_data(), logits.shape(0), logits.shape(1), grad_scale);
    return py::make_tuple(losses, z);
  }, py::arg("logits"), py::arg("targets"), py::arg("grad_scale") = 1.0f,
  "Returns (losses, grad_scale * (softmax - onehot)).");
}

void def_adamw(py::module_& ops, const char* name, AdamWFn fn) {
  ops.def(name, [fn, name](FloatArray p, FloatArray g, FloatArray m, FloatArray v, float lr, float beta1,
                           float beta2, float eps, float weight_decay, int step, float grad_scale) {
    LLAMAS_CHECK(p.size() == g.size() && p.size() == m.size() && p.size() == v.size() && step >= 1, name,
                 "p, g, m, v must have one size and step >= 1");
    FloatArray p2 = new_array({p.size()}), m2 = new_array({p.size()}), v2 = new_array({p.size()});
    std::memcpy(p2.mutable_data(), p.data(), p.size() * 4), std::memcpy(m2.mutable_data(), m.data(), p.size() * 4);
    std::memcpy(v2.mutable_data(), v.data(), p.size() * 4);
    AdamWArgs a;
    a.lr = lr, a.beta1 = beta1, a.beta2 = beta2, a.eps = eps, a.weight_decay = weight_decay, a.grad_scale = grad_scale;
    a.bias_correction1 = float(1.0 - std::pow(double(beta1), step));
    a.bias_correction2 = float(1.0 - std::pow(double(beta2), step));
    fn(p2.mutable_data(), g.data(), m2.mutable_data(), v2.mutable_data(), p.size(), a);
    return py::make_tuple(p2, m2, v2);
  });
}

void init_train_ops(py::module_& m) {
  py::module_ ops = m.attr("ops").cast<py::module_>();
  def_layernorm_backward(ops, "layernorm_backward", &ops::layernorm_backward);
  def_gelu_backward(ops, "gelu_backward", &ops::gelu_backward);
  def_cross_entropy(ops, "cross_entropy", &ops::cross_entropy);
  def_adamw(ops, "adamw", &ops::adamw);
  ops.def("matmul_tn", [](FloatArray a, FloatArray b) {
    LLAMAS_CHECK(a.ndim() == 2 && b.ndim() == 2 && a.shape(0) == b.shape(0), "matmul_tn",
                 "expects a (K, M) and b (K, N)");
    int64_t K = a.shape(0), M = a.shape(1), N = b.shape(1);
    FloatArray c = new_array({M, N});
    GemmArgs g;
    g.M = M, g.N = N, g.K = K, g.A = a.data(), g.lda = M, g.a_trans = true;
    g.B = b.data(), g.ldb = N, g.C = c.mutable_data(), g.ldc = N;
    llamas_python::ReleaseGil release;
    ops::gemm(g);
    return c;
  }, "a.T @ b, reading a (K, M) without transposing it (the weight-gradient GEMM).");
  ops.def("column_sum", [](FloatArray x) {
    LLAMAS_CHECK(x.ndim() == 2, "column_sum", "expects a 2-D array");
    FloatArray out = new_array({x.shape(1)});
    std::memset(out.mutable_data(), 0, x.shape(1) * sizeof(float));
    ops::column_sum(x.data(), x.shape(0), x.shape(1), out.mutable_data());
    return out;
  });
  ops.def("attention_forward", [](FloatArray qkv, int n_head) {
    LLAMAS_CHECK(qkv.ndim() == 3 && qkv.shape(2) % (3 * n_head) == 0, "attention_forward",
                 "expects qkv (B, T, 3C) with C divisible by n_head");
    int64_t B = qkv.shape(0), T = qkv.shape(1), C = qkv.shape(2) / 3;
    FloatArray out = new_array({B, T, C}), lse = new_array({B, n_head, T});
    ops::attention_forward(qkv.data(), out.mutable_data(), lse.mutable_data(), B, T, n_head, C / n_head,
                           1.0f / std::sqrt(float(C / n_head)));
    return py::make_tuple(out, lse);
  });
  ops.def("attention_backward", [](FloatArray qkv, FloatArray out, FloatArray lse, FloatArray dout, int n_head) {
    LLAMAS_CHECK(qkv.ndim() == 3 && qkv.shape(2) % (3 * n_head) == 0, "attention_backward",
                 "expects qkv (B, T, 3C) with C divisible by n_head");
    int64_t B = qkv.shape(0), T = qkv.shape(1), C = qkv.shape(2) / 3;
    LLAMAS_CHECK(out.size() == B * T * C && dout.size() == B * T * C && lse.size() == B * n_head * T,
                 "attention_backward", "out, dout must be (B, T, C) and lse (B, H, T)");
    FloatArray dqkv = new_array({B, T, 3 * C});
    ops::attention_backward(qkv.data(), out.data(), lse.data(), dout.data(), dqkv.mutable_data(), B, T, n_head,
                            C / n_head, 1.0f / std::sqrt(float(C / n_head)));
    return dqkv;
  });
  ops.def("embedding_backward", [](IntArray ids, py::array_t<int64_t, py::array::c_style | py::array::forcecast> pos,
                                    FloatArray dx, int64_t V, int64_t P) {
    LLAMAS_CHECK(dx.ndim() == 2 && ids.size() == dx.shape(0) && pos.size() == dx.shape(0), "embedding_backward",
                 "expects ids (n), positions (n), dx (n, C)");
    int64_t n = dx.shape(0), C = dx.shape(1);
    for (int64_t i = 0; i < n; ++i)
      LLAMAS_CHECK(ids.data()[i] >= 0 && ids.data()[i] < V && pos.data()[i] >= 0 && pos.data()[i] < P,
                   "embedding_backward", "id or position out of range at ", i);
    FloatArray dwte = new_array({V, C}), dwpe = new_array({P, C});
    std::memset(dwte.mutable_data(), 0, V * C * 4), std::memset(dwpe.mutable_data(), 0, P * C * 4);
    ops::embedding_backward(ids.data(), pos.data(), n, dx.data(), dwte.mutable_data(), dwpe.mutable_data(), C);
    return py::make_tuple(dwte, dwpe);
  });
}

void init_reference_train_ops(py::module_& ops) {
  namespace ref = cpu::reference;
  def_layernorm_backward(ops, "reference_layernorm_backward", &ref::layernorm_backward);
  def_gelu_backward(ops, "reference_gelu_backward", &ref::gelu_backward);
  def_cross_entropy(ops, "reference_cross_entropy", &ref::cross_entropy);
  def_adamw(ops, "reference_adamw", &ref::adamw);
  ops.def("reference_attention_backward", [](FloatArray qkv, FloatArray dout, int n_head) {
    LLAMAS_CHECK(qkv.ndim() == 3 && qkv.shape(2) % (3 * n_head) == 0 && dout.size() * 3 == qkv.size(),
                 "reference_attention_backward", "expects qkv (B, T, 3C) and dout (B, T, C)");
    int64_t B = qkv.shape(0), T = qkv.shape(1), C = qkv.shape(2) / 3;
    FloatArray dqkv = new_array({B, T, 3 * C});
    ref::attention_backward(qkv.data(), dout.data(), dqkv.mutable_data(), B, T, n_head, C / n_head);
    return dqkv;
  });
}

}  // namespace

void init_train(py::module_& m) {
  py::module_ ops = m.attr("ops").cast<py::module_>();
  m.attr("IGNORE_TARGET") = ops::kIgnoreTarget;  // (train.py's, one definition)
  init_reference_train_ops(ops);
  init_train_ops(m);
  m.def("create_gpt2", [](const py::dict& config, uint64_t seed) {
    GPT2Config c = config_from_dict(config);
    llamas_python::ReleaseGil release;
    return new GPT2Model(c, init_gpt2_weights(c, seed));
  }, py::arg("config"), py::arg("seed"), "A GPT-2 with fresh float32 weights (GPT-2 initialisation).");

  m.attr("GPT2Model").cast<py::class_<GPT2Model>>().def("named_weights", [](py::object self) {
    GPT2Model& model = self.cast<GPT2Model&>();
    GPT2Weights w = model.weights();
    py::list out;
    for (auto& [name, t] : named_parameters(w)) out.append(py::make_tuple(name, tensor_view(*t, self)));
    return out;
  }, "[(Hugging Face name, numpy view)] of every parameter (bfloat16 as uint16 bits).")
   .def("loss", [](GPT2Model& model, IntArray inputs, IntArray targets) {
     check_batch_arrays(inputs, targets, "loss");
     const int64_t B = inputs.shape(0), T = inputs.shape(1), V = model.config().vocab_size;
     llamas_python::ReleaseGil release;
     // One row at a time keeps the logits at T x V floats whatever the batch size.
     double total = 0;
     int64_t counted = 0;
     std::vector<float> losses(T);
     for (int64_t b = 0; b < B; ++b) {
       Tensor logits = model.forward(inputs.data() + b * T, 1, T);
       ops::cross_entropy(logits.data<float>(), targets.data() + b * T, losses.data(), T, V, 0.0f);
       for (int64_t t = 0; t < T; ++t) {
         total += losses[t];
         counted += targets.data()[b * T + t] != ops::kIgnoreTarget;
       }
     }
     return std::make_pair(total, counted);
   }, py::arg("inputs"), py::arg("targets"),
   "(summed cross-entropy, targets counted) of targets given inputs (B, T), -100 targets left out; no gradients.");

  py::class_<GPT2Trainer>(m, "GPT2Trainer")
      .def(py::init([](GPT2Model& model, float beta1, float beta2, float eps, float weight_decay, float grad_clip) {
             OptimizerConfig o;
             o.beta1 = beta1, o.beta2 = beta2, o.eps = eps, o.weight_decay = weight_decay, o.grad_clip = grad_clip;
             return new GPT2Trainer(model, o);
           }),
           py::keep_alive<1, 2>(), py::arg("model"), py::arg("beta1") = 0.9f, py::arg("beta2") = 0.95f,
           py::arg("eps") = 1e-8f, py::arg("weight_decay") = 0.1f, py::arg("grad_clip") = 1.0f)
      .def("step", [](GPT2Trainer& t, IntArray inputs, IntArray targets, int64_t micro_batch, float lr) {
        check_batch_arrays(inputs, targets, "train_step");
        StepResult r;
        {
          llamas_python::ReleaseGil release;
          r = t.step(inputs.data(), targets.data(), inputs.shape(0), inputs.shape(1), micro_batch, lr);
        }
        return py::make_tuple(r.loss, r.grad_norm);
      }, py::arg("inputs"), py::arg("targets"), py::arg("micro_batch"), py::arg("lr"),
      "One optimizer step; returns (loss before the update, gradient norm before clipping).")
      .def("compute_gradients", [](GPT2Trainer& t, IntArray inputs, IntArray targets) {
        check_batch_arrays(inputs, targets, "compute_gradients");
        llamas_python::ReleaseGil release;
        return t.compute_gradients(inputs.data(), targets.data(), inputs.shape(0), inputs.shape(1));
      })
      .def_property("steps_done", &GPT2Trainer::steps_done, &GPT2Trainer::set_steps_done)
      .def("params", [](const GPT2Trainer& t) {
        py::list out;
        for (auto& p : t.params()) out.append(py::make_tuple(p.name, p.shape, p.decay));
        return out;
      }, "[(name, shape, decayed)] in buffer order.")
      .def("tensor", [](py::object self, const std::string& kind, const std::string& name) {
        GPT2Trainer& t = self.cast<GPT2Trainer&>();
        Tensor& flat = t.buffer(kind);
        for (auto& p : t.params())
          if (p.name == name) {
            std::vector<py::ssize_t> shape(p.shape.begin(), p.shape.end());
            return py::array_t<float>(shape, flat.data<float>() + p.offset, self);
          }
        fail("trainer", "no parameter named '", name, "'");
      }, py::arg("kind"), py::arg("name"),
      "A writable numpy view of one parameter's 'param', 'grad', 'exp_avg' or 'exp_avg_sq' values.");
}

}  // namespace python
}  // namespace llamas
