// llamas._C.ops: the CPU kernels on numpy arrays, for tests and benchmarks.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/reference.h"
#include "llamas/error.h"
#include "llamas/ops.h"
#include "python/convert.h"
#include "python/gil.h"

#include <cstring>
#include <optional>

namespace llamas {
namespace python {

// Runs f (which returns a Tensor) without the GIL, then hands the result to numpy without a copy.
template <typename F>
py::array_t<float> without_gil(F&& f) {
  Tensor t;
  {
    llamas_python::ReleaseGil release;
    t = f();
  }
  return to_numpy(t);
}

static BLayout parse_layout(const std::string& name) {
  if (name == "in_out") return BLayout::KN;
  if (name == "out_in") return BLayout::NK;
  fail("linear", "weight_layout must be 'in_out' (K, N) or 'out_in' (N, K), got '", name, "'");
}

void init_ops(py::module_& m) {
  py::module_ ops = m.def_submodule("ops", "CPU kernels on numpy float32 arrays");
  ops.def("matmul", [](FloatArray a, FloatArray b) {
    Tensor ta = view_of(a), tb = view_of(b);
    return without_gil([&] { return ops::matmul(ta, tb); });
  }, py::arg("a"), py::arg("b"), "a @ b for float32 (M, K) and (K, N) arrays.");

  ops.def("linear", [](FloatArray x, FloatArray w, std::optional<FloatArray> bias, bool gelu,
                       const std::string& weight_layout, const std::string& weight_dtype, bool packed,
                       const std::string& compute_dtype) {
    BLayout layout = parse_layout(weight_layout);
    DType wd = parse_dtype(weight_dtype, "linear", "weight_dtype", true);
    DType cd = parse_dtype(compute_dtype, "linear", "compute_dtype", true);
    Tensor tx = view_of(x), tw = view_of(w);
    Tensor tb = bias ? view_of(*bias) : Tensor();
    return without_gil([&] {
      // bfloat16 compute runs over panels only (the layout its kernel reads pairs of k rows from),
      // and int8 weights exist only as panels.
      if (packed || cd != DType::F32 || wd == DType::I8)
        return ops::linear(tx, ops::pack_panels(tw, layout, wd), bias ? &tb : nullptr, gelu, cd);
      return ops::linear(tx, ops::cast(tw, wd), layout, bias ? &tb : nullptr, gelu);
    });
  }, py::arg("x"), py::arg("w"), py::arg("bias") = py::none(), py::arg("gelu") = false,
     py::arg("weight_layout") = "in_out", py::arg("weight_dtype") = "float32", py::arg("packed") = false,
     py::arg("compute_dtype") = "float32",
     "x @ w (+ bias) (then GELU). weight_layout 'in_out' is w (K, N) like GPT-2's Conv1D, 'out_in' is "
     "w (N, K) like nn.Linear. weight_dtype 'bfloat16' rounds w to bfloat16 first, 'int8' quantizes it "
     "(per column, 32 rows at a time: llamas.ops.dequantize shows the values used). packed=True first "
     "packs w into the GEMM's panel layout, as loaded models hold their matrices. compute_dtype "
     "'bfloat16' (bfloat16 or int8 weights) also rounds x to bfloat16 and sums k in pairs, as VDPBF16PS "
     "does (twice the multiply-adds per instruction on CPUs with AVX512_BF16). compute_dtype 'int8' (int8 "
     "weights) quantizes x as the weights are, 32 k at a time, and scales each block's integer dot by "
     "both scales (W8A8, as llama.cpp's Q8_0; VPDPBUSD on CPUs with AVX512_VNNI).");

  py::class_<ops::PackedMatrix>(ops, "PackedWeight",
      "A weight matrix in the GEMM's panel layout, as loaded models hold theirs (from llamas.ops.pack).")
      .def_property_readonly("in_features", [](const ops::PackedMatrix& p) { return p.K; })
      .def_property_readonly("out_features", [](const ops::PackedMatrix& p) { return p.N; })
      .def_property_readonly("dtype", [](const ops::PackedMatrix& p) { return std::string(dtype_name(p.dtype())); })
      .def_property_readonly("nbytes", [](const ops::PackedMatrix& p) { return p.data.nbytes(); })
      .def_property("streamed", [](const ops::PackedMatrix& p) { return p.streamed; },
                    [](ops::PackedMatrix& p, bool on) { p.streamed = on; },
                    "Whether one-row products read it one panel at a time (see llamas.ops.pack).");
  ops.def("pack", [](FloatArray w, const std::string& weight_layout, const std::string& weight_dtype, bool streamed) {
    BLayout layout = parse_layout(weight_layout);
    DType wd = parse_dtype(weight_dtype, "pack", "weight_dtype", true);
    Tensor tw = view_of(w);
    llamas_python::ReleaseGil release;
    ops::PackedMatrix p = ops::pack_panels(tw, layout, wd);
    p.streamed = streamed;
    return p;
  }, py::arg("w"), py::arg("weight_layout") = "in_out", py::arg("weight_dtype") = "float32",
     py::arg("streamed") = false,
     "Packs w once into the GEMM's panel layout; llamas.ops.linear(x, packed) then never repacks it. "
     "weight_dtype 'int8' quantizes: each column's weights 32 rows at a time as int8 times one float32 "
     "scale (their largest magnitude / 127). streamed=True: one-row products read it one panel at a "
     "time, as a loaded model does with weights larger than the last-level cache (same results).");
  ops.def("dequantize", [](const ops::PackedMatrix& p) {
    return without_gil([&] { return ops::dequantize_panels(p); });
  }, py::arg("packed"), "The float32 (K, N) weights int8 panels stand for (q * scale, as the GEMM forms them).");
  ops.def("linear", [](FloatArray x, const ops::PackedMatrix& w, std::optional<FloatArray> bias, bool gelu,
                       const std::string& compute_dtype) {
    DType cd = parse_dtype(compute_dtype, "linear", "compute_dtype", true);
    Tensor tx = view_of(x);
    Tensor tb = bias ? view_of(*bias) : Tensor();
    return without_gil([&] { return ops::linear(tx, w, bias ? &tb : nullptr, gelu, cd); });
  }, py::arg("x"), py::arg("w"), py::arg("bias") = py::none(), py::arg("gelu") = false,
     py::arg("compute_dtype") = "float32",
     "x @ w (+ bias) (then GELU) with w from llamas.ops.pack (compute_dtype as for the other form).");

  ops.def("layernorm", [](FloatArray x, FloatArray w, FloatArray b, float eps) {
    Tensor tx = view_of(x), tw = view_of(w), tb = view_of(b);
    return without_gil([&] { return ops::layernorm(tx, tw, tb, eps); });
  }, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps") = 1e-5f, "Layer norm over the last dimension.");

  ops.def("residual_layernorm", [](FloatArray x, FloatArray delta, FloatArray w, FloatArray b, float eps) {
    Tensor tx = ops::cast(view_of(x), DType::F32);
    Tensor copy = Tensor::empty(tx.shape(), DType::F32);
    std::memcpy(copy.raw(), tx.raw(), tx.nbytes());
    Tensor td = view_of(delta), tw = view_of(w), tb = view_of(b);
    Tensor out;
    {
      llamas_python::ReleaseGil release;
      out = ops::residual_layernorm(copy, td, tw, tb, eps);
    }
    return py::make_tuple(to_numpy(copy), to_numpy(out));
  }, py::arg("x"), py::arg("delta"), py::arg("weight"), py::arg("bias"), py::arg("eps") = 1e-5f,
     "Returns (x + delta, layernorm(x + delta)).");

  ops.def("gelu", [](FloatArray x) {
    Tensor t = view_of(x);
    return without_gil([&] { return ops::gelu(t); });
  }, py::arg("x"), "GELU, tanh approximation (GPT-2's gelu_new).");

  ops.def("softmax", [](FloatArray x) {
    Tensor t = view_of(x);
    return without_gil([&] { return ops::softmax(t); });
  }, py::arg("x"), "Softmax over the last dimension.");

  ops.def("log_softmax", [](FloatArray x, bool reference) {
    Tensor t = view_of(x);
    return without_gil([&] { return ops::log_softmax(t, reference); });
  }, py::arg("x"), py::arg("reference") = false,
     "Log-softmax over the last dimension (reference=True: the normaliser by the plain double loop). "
     "A row holding NaN or +inf, or only -inf, comes out NaN.");

  ops.def("attention", [](FloatArray q, FloatArray k, FloatArray v, const std::string& kv_dtype, bool reference) {
    DType kd = parse_dtype(kv_dtype, "attention", "kv_dtype", true);
    Tensor tq = view_of(q), tk = view_of(k), tv = view_of(v);
    return without_gil([&] { return ops::attention(tq, tk, tv, kd, reference); });
  }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("kv_dtype") = "float32", py::arg("reference") = false,
     "Causal scaled dot-product attention on (B, H, T, D) arrays (the fused, tiled kernel, or with "
     "reference=True the plain one). kv_dtype 'bfloat16' rounds k and v to bfloat16 first, as a bfloat16 "
     "KV cache stores them; 'int8' quantizes each head's key and value vectors (scale max |x| / 127).");

  ops.def("reference_matmul", [](FloatArray a, FloatArray b, const std::string& compute_dtype) {
    LLAMAS_CHECK(a.ndim() == 2 && b.ndim() == 2 && a.shape(1) == b.shape(0), "reference_matmul", "bad shapes");
    const DType cd = parse_dtype(compute_dtype, "reference_matmul", "compute_dtype", true);
    Tensor out = Tensor::empty({a.shape(0), b.shape(1)}, DType::F32);
    Tensor tb = view_of(b);
    return without_gil([&] {
      GemmArgs g;
      g.M = a.shape(0), g.K = a.shape(1), g.N = b.shape(1);
      g.A = a.data(), g.lda = g.K, g.B = b.data(), g.ldb = g.N, g.C = out.data<float>(), g.ldc = g.N;
      ops::PackedMatrix panels;
      if (cd != DType::F32) {  // bfloat16 (int8) compute reads bfloat16 (int8) panels, as the kernel does
        panels = ops::pack_panels(tb, BLayout::KN, cd);
        g.B = panels.data.raw(), g.b_layout = BLayout::Panels, g.ldb = g.K;
        g.b_bf16 = g.a_bf16 = cd == DType::BF16;
        g.b_i8 = g.a_i8 = cd == DType::I8;
      }
      cpu::reference::gemm(g);
      return out;
    });
  }, py::arg("a"), py::arg("b"), py::arg("compute_dtype") = "float32",
     "The plain reference GEMM (one fma chain per element). compute_dtype 'bfloat16': a and b rounded "
     "to bfloat16, k summed in pairs as VDPBF16PS does; 'int8': a and b quantized per 32 k (b per "
     "column), one fma per block of the block's integer dot times both scales.");

}

}  // namespace python
}  // namespace llamas
