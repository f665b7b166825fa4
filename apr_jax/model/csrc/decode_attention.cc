// Fused single-query attention over a stacked KV cache, for decoding on CPU (an XLA FFI custom call).
//
// One call handles every row and head of one layer: row b's query heads n = kh * G + g attend to the first
// limit[b] key slots of kv head kh, read in place from the stacked cache [L, B, K, S, H] at layer
// layer[0]. Exact softmax in fp32 (two passes over the row's scores); a row with limit 0 gets zeros. The
// cache holds fp32 or bf16 (also as u16 bit patterns), widened to fp32 on load (bf16 is the top half of an
// fp32). Decoding many rows is bound by memory traffic through the cache (docs/inference.md), which a bf16
// cache halves.
// XLA:CPU runs the same computation as rows x heads tiny batched dots with a fixed cost per dot, which
// is what makes many-row decoding slow there (docs/inference.md); here each (row, kv head) is one
// contiguous sweep over its keys and values. Rows are split over XLA's intra-op thread pool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Below this many multiply-adds per call, handing work to other threads costs more than it saves.
constexpr int64_t kParallelWork = 1 << 16;

inline float Widen(float x) { return x; }
inline float Widen(uint16_t bf16) {  // bf16 -> fp32: the 16 bits are the top half of the fp32
  const uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// scores[0:n] <- exp(scores - max(scores)), the softmax numerators; returns their sum (n >= 1).
inline float ExpShifted(float* __restrict scores, int64_t n) {
  float max_score = scores[0];
  for (int64_t s = 1; s < n; ++s) max_score = std::max(max_score, scores[s]);
  float total = 0.0f;
  for (int64_t s = 0; s < n; ++s) {
    scores[s] = std::exp(scores[s] - max_score);
    total += scores[s];
  }
  return total;
}

// HD > 0: the head dimension as a compile-time constant (unrolled, vectorised dots); HD == 0: any head_dim.
// T: the cache's storage type (float, or uint16_t holding bf16).
template <typename T, int64_t HD>
void AttendRow(const float* __restrict q, const T* __restrict k, const T* __restrict v,
               float* __restrict out, int64_t limit, int64_t groups, int64_t head_dim_arg, float scale,
               std::vector<float>& scores) {
  // q, out: [G, H] of this (row, kv head); k, v: [S, H] of this (layer, row, kv head).
  const int64_t head_dim = HD > 0 ? HD : head_dim_arg;
  if (limit <= 0) {
    std::fill(out, out + groups * head_dim, 0.0f);
    return;
  }
  scores.resize(static_cast<size_t>(groups * limit));
  for (int64_t g = 0; g < groups; ++g) {
    const float* __restrict qg = q + g * head_dim;
    float* __restrict sg = scores.data() + g * limit;
    for (int64_t s = 0; s < limit; ++s) {
      const T* __restrict ks = k + s * head_dim;
      float dot = 0.0f;
      for (int64_t h = 0; h < head_dim; ++h) dot += qg[h] * Widen(ks[h]);
      sg[s] = dot * scale;
    }
    const float total = ExpShifted(sg, limit);
    float acc[HD > 0 ? HD : 1];
    float* __restrict og = HD > 0 ? acc : out + g * head_dim;
    std::fill(og, og + head_dim, 0.0f);
    for (int64_t s = 0; s < limit; ++s) {
      const T* __restrict vs = v + s * head_dim;
      const float p = sg[s];
      for (int64_t h = 0; h < head_dim; ++h) og[h] += p * Widen(vs[h]);
    }
    const float inv = 1.0f / total;
    float* __restrict dst = out + g * head_dim;
    for (int64_t h = 0; h < head_dim; ++h) dst[h] = og[h] * inv;
  }
}

#if defined(__AVX512F__)
typedef float V16 __attribute__((vector_size(64)));
typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));

inline V16 Load16(const float* p) { V16 v; std::memcpy(&v, p, sizeof(v)); return v; }
inline V16 Load16(const uint16_t* p) {  // 16 bf16 -> fp32
  U16x16 h; std::memcpy(&h, p, sizeof(h));
  U32x16 w = __builtin_convertvector(h, U32x16) << 16;
  V16 v; std::memcpy(&v, &w, sizeof(v)); return v;
}
inline float Sum16(V16 v) { float s = 0; for (int i = 0; i < 16; ++i) s += v[i]; return s; }

// The lane-wise products q * key of one key of HD = 16 * C values, folded to one vector (its lanes sum to the dot).
template <typename T, int C>
inline V16 KeyProducts(const V16* qv, const T* key) {
  V16 p = qv[0] * Load16(key);
  for (int c = 1; c < C; ++c) p += qv[c] * Load16(key + 16 * c);
  return p;
}

// r[j] = sum of the lanes of v[j], j < 16 (a transpose-and-add tree: 15 combine steps, no per-vector
// horizontal sum).
inline V16 SumEach16(const V16* v) {
  V16 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)
    w[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    x[i] = __builtin_shufflevector(w[2 * i], w[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(w[2 * i], w[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    y[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(x[2 * i], x[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(y[0], y[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(y[0], y[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// AttendRow for head_dim HD = 16 * C with AVX-512: the scores of 16 keys at a time (one vector of products
// per key, summed across lanes by SumEach16 instead of one horizontal sum per key) and the values
// accumulated over U keys at once (U independent FMA chains instead of one). Same arithmetic up to the
// order of the sums; about 30% faster than AttendRow at one row and at ten (experiments/bench_kernels.py,
// docs/inference.md).
template <typename T, int64_t HD>
void AttendRowVec(const float* __restrict q, const T* __restrict k, const T* __restrict v, float* __restrict out,
                  int64_t limit, int64_t groups, int64_t /*head_dim: HD*/, float scale, std::vector<float>& scores) {
  constexpr int C = HD / 16;
  constexpr int U = C >= 8 ? 1 : 8 / C;  // keys per value step: 8 accumulators in flight
  if (limit <= 0) { std::fill(out, out + groups * HD, 0.0f); return; }
  scores.resize(static_cast<size_t>(groups * limit));
  for (int64_t g = 0; g < groups; ++g) {
    V16 qv[C];
    for (int c = 0; c < C; ++c) qv[c] = Load16(q + g * HD + 16 * c) * scale;
    float* __restrict sg = scores.data() + g * limit;
    int64_t s = 0;
    for (; s + 16 <= limit; s += 16) {
      V16 prod[16];
      for (int j = 0; j < 16; ++j) prod[j] = KeyProducts<T, C>(qv, k + (s + j) * HD);
      const V16 r = SumEach16(prod);
      std::memcpy(sg + s, &r, sizeof(r));
    }
    for (; s < limit; ++s) sg[s] = Sum16(KeyProducts<T, C>(qv, k + s * HD));
    const float total = ExpShifted(sg, limit);
    V16 acc[U][C] = {};
    s = 0;
    for (; s + U <= limit; s += U)
      for (int u = 0; u < U; ++u)
        for (int c = 0; c < C; ++c) acc[u][c] += sg[s + u] * Load16(v + (s + u) * HD + 16 * c);
    for (; s < limit; ++s)
      for (int c = 0; c < C; ++c) acc[0][c] += sg[s] * Load16(v + s * HD + 16 * c);
    const float inv = 1.0f / total;
    for (int c = 0; c < C; ++c) {
      V16 o = acc[0][c];
      for (int u = 1; u < U; ++u) o += acc[u][c];
      o *= inv;
      std::memcpy(out + g * HD + 16 * c, &o, sizeof(o));
    }
  }
}
#endif

template <typename T>
using AttendFn = void (*)(const float*, const T*, const T*, float*, int64_t, int64_t, int64_t, float,
                          std::vector<float>&);

template <typename T>
AttendFn<T> SelectAttend(int64_t head_dim) {
  switch (head_dim) {
#if defined(__AVX512F__)
    case 32: return AttendRowVec<T, 32>;
    case 64: return AttendRowVec<T, 64>;
#else
    case 32: return AttendRow<T, 32>;
    case 64: return AttendRow<T, 64>;
#endif
    case 128: return AttendRow<T, 128>;
    default: return AttendRow<T, 0>;
  }
}

template <typename T>
void AttendAll(ffi::ThreadPool& pool, const float* qp, const T* kp, const T* vp, const int32_t* lim, float* op,
               int64_t rows, int64_t heads, int64_t head_dim, int64_t kv_heads, int64_t slots, int64_t l,
               float scale) {
  const int64_t groups = heads / kv_heads;
  const int64_t units = rows * kv_heads;
  const AttendFn<T> attend = SelectAttend<T>(head_dim);
  int64_t keys = 0;
  for (int64_t b = 0; b < rows; ++b) keys += std::min<int64_t>(std::max<int32_t>(lim[b], 0), slots);
  // One unit = one (row, kv head).
  apr_parallel::ForEachUnit(pool, units, keys * kv_heads * head_dim * groups >= kParallelWork, [=](int64_t u) {
    thread_local std::vector<float> scores;
    const int64_t b = u / kv_heads, kh = u % kv_heads;
    const int64_t n = std::min<int64_t>(std::max<int32_t>(lim[b], 0), slots);
    const int64_t cache_off = ((l * rows + b) * kv_heads + kh) * slots * head_dim;
    const int64_t q_off = (b * heads + kh * groups) * head_dim;
    attend(qp + q_off, kp + cache_off, vp + cache_off, op + q_off, n, groups, head_dim, scale, scores);
  });
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                               ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> limit,
                               ffi::ResultBuffer<ffi::F32> out, float scale) {
  auto qd = q.dimensions();  // [B, N, H]
  auto kd = k.dimensions();  // [L, B, K, S, H]
  if (qd.size() != 3 || kd.size() != 5) {
    return ffi::Error::InvalidArgument("decode_attention: q must be [B, N, H] and the cache [L, B, K, S, H]");
  }
  const int64_t rows = qd[0], heads = qd[1], head_dim = qd[2];
  const int64_t layers = kd[0], kv_heads = kd[2], slots = kd[3];
  if (kd[1] != rows || kd[4] != head_dim || heads % kv_heads != 0 || limit.element_count() != rows ||
      v.element_count() != k.element_count()) {
    return ffi::Error::InvalidArgument("decode_attention: shapes of q, cache and limits do not agree");
  }
  const ffi::DataType type = k.element_type();
  if (v.element_type() != type ||
      (type != ffi::DataType::F32 && type != ffi::DataType::BF16 && type != ffi::DataType::U16)) {
    return ffi::Error::InvalidArgument(
        "decode_attention: the cache must be float32, bfloat16 or uint16 (bf16 bits), keys as values");
  }
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= layers) return ffi::Error::InvalidArgument("decode_attention: layer out of range");
  if (type == ffi::DataType::F32) {
    AttendAll(pool, q.typed_data(), static_cast<const float*>(k.untyped_data()),
              static_cast<const float*>(v.untyped_data()), limit.typed_data(), out->typed_data(), rows, heads,
              head_dim, kv_heads, slots, l, scale);
  } else {
    AttendAll(pool, q.typed_data(), static_cast<const uint16_t*>(k.untyped_data()),
              static_cast<const uint16_t*>(v.untyped_data()), limit.typed_data(), out->typed_data(), rows, heads,
              head_dim, kv_heads, slots, l, scale);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AprDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
