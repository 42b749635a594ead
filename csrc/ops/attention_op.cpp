// ops::attention: causal attention on contiguous (B, H, T, D) arrays through the model's kernel,
// over a temporary paged KV cache of float32, bfloat16 or int8 entries (tests and benchmarks).
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/reference.h"
#include "llamas/kv_block.h"
#include "llamas/ops.h"
#include "ops/checks.h"

namespace llamas {
namespace ops {

namespace {
// k and v of batch element b, (H, T, D), into paged KV blocks of entries T_, one position at a time
// through the cache's own writer (a position's heads gathered into rows first).
template <typename T_>
void fill_kv_blocks(const float* kd, const float* vd, int64_t b, int64_t H, int64_t T, int64_t D, T_* kb, T_* vb) {
  const int64_t block_entries = kv_region_bytes(sizeof(T_), H, D) / int64_t(sizeof(T_));
  std::vector<float> krow(H * D), vrow(H * D);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t src = ((b * H + h) * T + t) * D;
      std::memcpy(krow.data() + h * D, kd + src, D * sizeof(float));
      std::memcpy(vrow.data() + h * D, vd + src, D * sizeof(float));
    }
    const int64_t blk = t / kKvBlockSize;
    kv_block_write(kb + blk * block_entries, vb + blk * block_entries, int(H), int(D), t % kKvBlockSize, krow.data(),
                   vrow.data());
  }
}
}  // namespace

Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, DType kv_dtype, bool reference) {
  const char* op = "attention";
  require_f32(q, op, "q");
  require_f32(k, op, "k");
  require_f32(v, op, "v");
  require_cpu(q, op);
  LLAMAS_CHECK(kv_dtype == DType::F32 || kv_dtype == DType::BF16 || kv_dtype == DType::I8, op,
               "kv_dtype must be float32, bfloat16 or int8, got ", dtype_name(kv_dtype));
  LLAMAS_CHECK(q.ndim() == 4, op, "q must be (B, H, T, D), got ", q.describe());
  LLAMAS_CHECK(k.shape() == q.shape() && v.shape() == q.shape(), op, "q, k, v shapes differ: ", q.describe(),
               ", ", k.describe(), ", ", v.describe());
  const int64_t B = q.dim(0), H = q.dim(1), T = q.dim(2), D = q.dim(3);
  LLAMAS_CHECK(D >= 1 && D <= 256, op, "head dimension must be in [1, 256], got ", D);
  Tensor out = Tensor::empty(q.shape(), DType::F32);
  if (B * H * T == 0) return out;
  const int64_t n_blocks = (T + kKvBlockSize - 1) / kKvBlockSize;
  const size_t entry_bytes = dtype_size(kv_dtype);
  const int64_t block_entries = kv_region_bytes(int64_t(entry_bytes), H, D) / int64_t(entry_bytes);  // (int8: + scales)
  // Re-lay q and out as (T, H*D) rows and k, v as paged blocks, per batch element.
  Tensor qrows = Tensor::empty({B, T, H * D}, DType::F32);
  Tensor orows = Tensor::empty({B, T, H * D}, DType::F32);
  Tensor kblocks = Tensor::zeros({B, n_blocks, block_entries}, kv_dtype);
  Tensor vblocks = Tensor::zeros({B, n_blocks, block_entries}, kv_dtype);
  std::vector<const void*> kptr(B * n_blocks), vptr(B * n_blocks);
  std::vector<AttentionArgs> args(B);
  const float* qd = q.data<float>();
  for (int64_t b = 0; b < B; ++b) {
    float* qr = qrows.data<float>() + b * T * H * D;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(qr + t * H * D + h * D, qd + ((b * H + h) * T + t) * D, D * sizeof(float));
    char* kb = static_cast<char*>(kblocks.raw()) + b * n_blocks * block_entries * entry_bytes;
    char* vb = static_cast<char*>(vblocks.raw()) + b * n_blocks * block_entries * entry_bytes;
    if (kv_dtype == DType::I8)
      fill_kv_blocks(k.data<float>(), v.data<float>(), b, H, T, D, reinterpret_cast<int8_t*>(kb),
                     reinterpret_cast<int8_t*>(vb));
    else if (kv_dtype == DType::BF16)
      fill_kv_blocks(k.data<float>(), v.data<float>(), b, H, T, D, reinterpret_cast<uint16_t*>(kb),
                     reinterpret_cast<uint16_t*>(vb));
    else
      fill_kv_blocks(k.data<float>(), v.data<float>(), b, H, T, D, reinterpret_cast<float*>(kb),
                     reinterpret_cast<float*>(vb));
    for (int64_t i = 0; i < n_blocks; ++i) {
      kptr[b * n_blocks + i] = kb + i * block_entries * entry_bytes;
      vptr[b * n_blocks + i] = vb + i * block_entries * entry_bytes;
    }
    AttentionArgs& a = args[b];
    a.n_head = int(H), a.head_dim = int(D);
    a.n_query = T, a.first_pos = 0;
    a.q = qr, a.q_stride = H * D;
    a.out = orows.data<float>() + b * T * H * D, a.out_stride = H * D;
    a.k_blocks = kptr.data() + b * n_blocks;
    a.v_blocks = vptr.data() + b * n_blocks;
    a.kv_bf16 = kv_dtype == DType::BF16, a.kv_i8 = kv_dtype == DType::I8;
    a.scale = 1.0f / std::sqrt(float(D));
  }
  if (reference)
    for (const AttentionArgs& a : args) cpu::reference::attention(a);
  else
    paged_attention(args.data(), int(B));
  float* od = out.data<float>();
  const float* orw = orows.data<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t)
        std::memcpy(od + ((b * H + h) * T + t) * D, orw + (b * T + t) * H * D + h * D, D * sizeof(float));
  return out;
}

}  // namespace ops
}  // namespace llamas
