// Kernel tables without Python: GEMM GFLOP/s at GPT-2 shapes for every kernel variant this CPU
// runs, validated against the reference GEMM before timing, with B as stored (K, N) (packed per
// call) and with B prepacked into panels (ops::pack_panels, as loaded models hold their weights);
// then bfloat16 panels with bfloat16 compute (GemmArgs::a_bf16) and int8 panels with int8 compute
// (GemmArgs::a_i8), each checked bit for bit against the reference; then decode attention over
// paged KV caches (bench_decode_attention.cpp). Compare with numpy in
// bench/compare.py. `bench_kernels --check` only checks, at small odd shapes that take every GEMM
// path (streamed rows, few-row panel tiles, the blocked path), and exits 1 on a mismatch: a quick
// self-test for a new machine or an emulator (an AArch64 build under qemu-user: tools/aarch64_check.sh).
#include <algorithm>
#include <chrono>
#include <cstring>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/kernel_table.h"
#include "cpu/reference.h"
#include "llamas/ops.h"
#include "llamas/parallel.h"

using namespace llamas;

void print_decode_attention_table();  // bench_decode_attention.cpp

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

// Runs g (into g.C), then checks its first `rows` rows against the reference GEMM: bit for bit, or
// for the generic variant (plain loops the compiler may vectorise in another order) within float32
// rounding of the sums.
static bool matches_reference(const GemmArgs& g, int64_t rows, bool exact) {
  cpu::kernels().gemm(g);
  std::vector<float> R(size_t(rows) * g.N, 0.0f);
  GemmArgs r = g;
  r.M = rows, r.C = R.data(), r.ldc = g.N;
  cpu::reference::gemm(r);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t n = 0; n < g.N; ++n) {
      const float c = g.C[m * g.ldc + n], ref = R[m * g.N + n];
      if (exact ? c != ref : !(std::fabs(c - ref) <= 1e-5f * (std::fabs(ref) + float(g.K)))) return false;
    }
  return true;
}

// Checks g's first 4 rows bit for bit (the reference is a plain triple loop), then times it.
static double checked_time(const GemmArgs& g, int reps, bool& same) {
  same = matches_reference(g, std::min<int64_t>(g.M, 4), true);
  return time_gemm(g, reps);
}

static int check_kernels() {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  int failures = 0, checks = 0;
  for (const std::string& variant : cpu::available_variants()) {
    cpu::set_variant(variant);
    const bool exact = variant != "generic";
    for (int M : {1, 2, 3, 4, 5, 7, 9, 13, 16, 17, 31, 40, 70})
      for (int K : {1, 33, 97})
        for (int N : {1, 17, 61, 130}) {
          // Even row counts read A with rows padded apart (lda > K): the few-row tiles read A's rows
          // in place, at lda.
          const int lda = K + (M % 2 == 0 ? 3 : 0);
          std::vector<float> A(size_t(M) * lda), B(size_t(K) * N), bias(N), C(size_t(M) * N);
          for (auto& x : A) x = normal(rng);
          for (auto& x : B) x = normal(rng);
          for (auto& x : bias) x = normal(rng);
          GemmArgs g;
          g.M = M, g.N = N, g.K = K, g.A = A.data(), g.lda = lda, g.B = B.data(), g.ldb = N, g.C = C.data(), g.ldc = N;
          g.bias = bias.data();  // (no GELU: the kernels' tanh is a polynomial, the reference's std::tanh)
          Tensor b_view = Tensor::view_external(B.data(), {K, N}, DType::F32, nullptr);
          ops::PackedMatrix f32 = ops::pack_panels(b_view, BLayout::KN, DType::F32);
          ops::PackedMatrix bf16 = ops::pack_panels(b_view, BLayout::KN, DType::BF16);
          ops::PackedMatrix i8 = ops::pack_panels(b_view, BLayout::KN, DType::I8);
          GemmArgs panels = g;
          panels.B = f32.data.raw(), panels.b_layout = BLayout::Panels, panels.ldb = K;
          GemmArgs panels_bf16 = panels, panels_bf16_compute = panels, panels_i8_compute = panels;
          panels_bf16.B = bf16.data.raw(), panels_bf16.b_bf16 = true;
          panels_bf16_compute.B = bf16.data.raw(), panels_bf16_compute.b_bf16 = true, panels_bf16_compute.a_bf16 = true;
          panels_i8_compute.B = i8.data.raw(), panels_i8_compute.b_i8 = true, panels_i8_compute.a_i8 = true;
          // A^T stored (K, M), as training's weight gradients read their activations (a_trans: every
          // row count takes the blocked path, its panels packed from runs of A^T's rows).
          std::vector<float> At(size_t(K) * M);
          for (int m = 0; m < M; ++m)
            for (int k = 0; k < K; ++k) At[size_t(k) * M + m] = A[size_t(m) * lda + k];
          GemmArgs a_transposed = g;
          a_transposed.A = At.data(), a_transposed.lda = M, a_transposed.a_trans = true;
          const std::pair<const char*, const GemmArgs*> cases[] = {
              {"B stored (K, N)", &g}, {"float32 panels", &panels}, {"bfloat16 panels", &panels_bf16},
              {"bfloat16 panels, bfloat16 compute", &panels_bf16_compute},
              {"int8 panels, int8 compute", &panels_i8_compute}, {"A^T stored (K, M)", &a_transposed}};
          for (const auto& [what, args] : cases) {
            ++checks;
            if (!matches_reference(*args, M, exact)) {
              ++failures;
              std::printf("MISMATCH: %s, %s, %d x %d x %d\n", variant.c_str(), what, M, K, N);
            }
          }
        }
  }
  std::printf("%d of %d GEMM checks match the reference (variants:", checks - failures, checks);
  for (const std::string& variant : cpu::available_variants()) std::printf(" %s", variant.c_str());
  std::printf(")\n");
  return failures == 0 ? 0 : 1;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--check") == 0) return check_kernels();
  if (argc > 1 && std::strcmp(argv[1], "--attention") == 0) {
    std::printf("threads: %d\n", num_threads());
    print_decode_attention_table();
    return 0;
  }
  if (argc > 1) {
    std::fprintf(stderr, "usage: bench_kernels [--check | --attention]\n  (no argument: the GEMM table at GPT-2 shapes, then "
                         "decode attention; --check: every variant against the reference at small odd shapes, exit 1 on a "
                         "mismatch; --attention: the decode attention table only)\n");
    return std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0 ? 0 : 2;
  }
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
      double sec_bf16 = checked_time(h, N > 10000 ? 3 : 9, same_bf16);
      ops::PackedMatrix packed_i8 = ops::pack_panels(b_view, BLayout::KN, DType::I8);
      GemmArgs q = p;
      q.B = packed_i8.data.raw(), q.b_i8 = true, q.a_i8 = true;
      double sec_i8 = checked_time(q, N > 10000 ? 3 : 9, same_i8);
      const double flop = 2.0 * M * K * N;
      std::printf("| %s | %d x %d x %d | %.1f | %.1f | %.1e | %.1f | %s | %.1f | %s |\n", variant.c_str(), M, K, N,
                  flop / sec / 1e9, flop / sec_packed / 1e9, err, flop / sec_bf16 / 1e9,
                  same_bf16 ? "bit-identical" : "DIFFERS", flop / sec_i8 / 1e9, same_i8 ? "bit-identical" : "DIFFERS");
    }
  }
  print_decode_attention_table();
  return 0;
}
