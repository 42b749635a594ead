// Kernel table without Python: GEMM GFLOP/s at GPT-2 shapes for every kernel variant this CPU
// runs, validated against the reference GEMM before timing, with B as stored (K, N) (packed per
// call) and with B prepacked into panels (ops::pack_panels, as loaded models hold their weights);
// then bfloat16 panels with bfloat16 compute (GemmArgs::a_bf16) and int8 panels with int8 compute
// (GemmArgs::a_i8), each checked bit for bit against the reference. Compare with numpy in
// bench/compare.py.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/kernel_table.h"
#include "cpu/reference.h"
#include "llamas/ops.h"
#include "llamas/parallel.h"

using namespace llamas;

static double time_gemm(const GemmArgs& g, int reps) {
  std::vector<double> times;
  cpu::kernels().gemm(g);  // warm-up
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    cpu::kernels().gemm(g);
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// Runs g, checks its first 4 rows bit for bit against the reference (into scratch), then times it.
static double checked_time(const GemmArgs& g, std::vector<float>& C, std::vector<float>& scratch, int reps, bool& same) {
  cpu::kernels().gemm(g);
  GemmArgs r = g;
  r.M = std::min<int64_t>(g.M, 4), r.C = scratch.data();
  cpu::reference::gemm(r);
  same = std::equal(C.begin(), C.begin() + size_t(r.M) * g.N, scratch.begin());
  return time_gemm(g, reps);
}

int main() {
  const int shapes[][3] = {{256, 768, 2304}, {256, 768, 3072}, {256, 3072, 768}, {1, 768, 3072}, {256, 768, 50257}};
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::printf("threads: %d\n\n| variant | M x K x N | GFLOP/s | prepacked B GFLOP/s | max rel err vs reference "
              "| bf16 B, bf16 compute GFLOP/s | = reference | int8 B, int8 compute GFLOP/s | = reference |\n"
              "|---|---|---|---|---|---|---|---|---|\n",
              num_threads());
  for (const std::string& variant : cpu::available_variants()) {
    cpu::set_variant(variant);
    for (auto& s : shapes) {
      const int M = s[0], K = s[1], N = s[2];
      std::vector<float> A(size_t(M) * K), B(size_t(K) * N), C(size_t(M) * N), R(size_t(M) * N);
      for (auto& x : A) x = normal(rng);
      for (auto& x : B) x = normal(rng);
      GemmArgs g;
      g.M = M, g.N = N, g.K = K, g.A = A.data(), g.lda = K, g.B = B.data(), g.ldb = N, g.C = C.data(), g.ldc = N;
      // Validate on the first 4 rows only: the reference is a plain triple loop.
      cpu::kernels().gemm(g);
      GemmArgs r = g;
      r.M = std::min(M, 4), r.C = R.data();
      cpu::reference::gemm(r);
      double err = 0;
      for (size_t i = 0; i < size_t(r.M) * N; ++i)
        err = std::max(err, double(std::fabs(C[i] - R[i]) / (std::fabs(R[i]) + 1.0f)));
      double sec = time_gemm(g, N > 10000 ? 3 : 9);
      Tensor b_view = Tensor::view_external(B.data(), {K, N}, DType::F32, nullptr);
      ops::PackedMatrix packed = ops::pack_panels(b_view, BLayout::KN, DType::F32);
      GemmArgs p = g;
      p.B = packed.data.raw(), p.b_layout = BLayout::Panels, p.ldb = K;
      double sec_packed = time_gemm(p, N > 10000 ? 3 : 9);
      ops::PackedMatrix packed_bf16 = ops::pack_panels(b_view, BLayout::KN, DType::BF16);
      GemmArgs h = p;
      h.B = packed_bf16.data.raw(), h.b_bf16 = true, h.a_bf16 = true;
      bool same_bf16 = false, same_i8 = false;
      double sec_bf16 = checked_time(h, C, R, N > 10000 ? 3 : 9, same_bf16);
      ops::PackedMatrix packed_i8 = ops::pack_panels(b_view, BLayout::KN, DType::I8);
      GemmArgs q = p;
      q.B = packed_i8.data.raw(), q.b_i8 = true, q.a_i8 = true;
      double sec_i8 = checked_time(q, C, R, N > 10000 ? 3 : 9, same_i8);
      const double flop = 2.0 * M * K * N;
      std::printf("| %s | %d x %d x %d | %.1f | %.1f | %.1e | %.1f | %s | %.1f | %s |\n", variant.c_str(), M, K, N,
                  flop / sec / 1e9, flop / sec_packed / 1e9, err, flop / sec_bf16 / 1e9,
                  same_bf16 ? "bit-identical" : "DIFFERS", flop / sec_i8 / 1e9, same_i8 ? "bit-identical" : "DIFFERS");
    }
  }
  return 0;
}
