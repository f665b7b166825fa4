// Exact attention over whole sequences with its backward pass, for training on CPU (XLA FFI custom calls).
//
// Layouts (as attention.py prepares them): q [B, K, G, T, H] (kv head K, query group G), k and v [B, K, S, H],
// per-row mask descriptors q_slot [B, T], q_seg [B, T], k_seg [B, S], k_limit [B] (key s is visible to query
// t iff s <= q_slot[t], s < k_limit and q_seg[t] == k_seg[s]). Forward returns the output and the
// log-sum-exp per query (0 for a query that sees no key, whose output is 0); backward recomputes the
// probabilities from it (FlashAttention-2's scheme) and returns dq, dk, dv.
//
// One work unit is one (row, kv head): its keys and values are packed once into column panels (tile.h) and
// every product (scores, probabilities x values, and in the backward pass dP, dQ, dK, dV) runs as
// register-blocked tiles of up to kMaxRows queries; a query block only visits keys up to its last visible
// one (causal). Units are shared between the calling thread and XLA's intra-op pool; a unit owns its dk/dv.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "tile.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using apr_tile::kMaxRows;
using apr_tile::kPanel;
using apr_tile::Panels;

// A per-thread buffer of at least n floats, reused across units and calls (contents unspecified).
float* Scratch(std::vector<float>& buffer, int64_t n) {
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// Queries per dK/dV product in the backward pass (probabilities and dS of this many rows are kept).
constexpr int64_t kBackwardRows = 4 * kMaxRows;

struct Dims {
  int64_t rows, kv_heads, groups, queries, keys, head_dim;
};

struct Masks {
  const int32_t* q_slot;  // [B, T]
  const int32_t* q_seg;   // [B, T]
  const int32_t* k_seg;   // [B, S]
  const int32_t* k_limit; // [B]
};

// Number of leading keys query t of row b may see at most (its causal/valid bound; segments still apply).
inline int64_t KeyBound(const Dims& d, const Masks& mk, int64_t b, int64_t t) {
  const int64_t slot = mk.q_slot[b * d.queries + t];
  const int64_t limit = mk.k_limit[b];
  return std::max<int64_t>(0, std::min<int64_t>({slot + 1, limit, d.keys}));
}

// Scaled scores of queries [t0, t0 + r) against keys [0, bound): probs[m * ld + s]. Then, per query, the
// masked exponentials exp(score - shift) with shift = the row max (forward, lse_out written) or the saved
// log-sum-exp (backward, lse_in given); masked and out-of-bound entries up to `bound` are 0.
void Probabilities(const Dims& d, const Masks& mk, int64_t b, int64_t t0, int64_t r, const float* q_rows,
                   const float* k_panels, int64_t bound, float scale, float* probs, int64_t ld,
                   const float* lse_in, float* lse_out, float* inv_sum) {
  apr_tile::Multiply(q_rows, d.head_dim, r, d.head_dim, k_panels, d.head_dim * kPanel, bound, probs, ld, false);
  const int32_t* k_seg = mk.k_seg + b * d.keys;
  constexpr float kMasked = -1e30f;  // finite (the build assumes finite maths); exp(kMasked - x) == 0
  for (int64_t m = 0; m < r; ++m) {
    const int64_t t = t0 + m;
    const int64_t n = KeyBound(d, mk, b, t);
    const int32_t seg = mk.q_seg[b * d.queries + t];
    float* row = probs + m * ld;
    // Branch-free passes, so the compiler vectorises them (exp through libmvec).
    for (int64_t s = 0; s < n; ++s) row[s] = k_seg[s] == seg ? row[s] * scale : kMasked;
    float shift = kMasked;
    if (lse_in != nullptr) {
      shift = lse_in[m];
    } else {
      for (int64_t s = 0; s < n; ++s) shift = std::max(shift, row[s]);
    }
    float total = 0.0f;
    if (shift > 0.5f * kMasked) {
      for (int64_t s = 0; s < n; ++s) {
        row[s] = std::exp(row[s] - shift);
        total += row[s];
      }
    } else {  // no visible key (forward); the backward's saved lse is 0 then, and every entry is masked
      std::fill(row, row + n, 0.0f);
    }
    std::fill(row + n, row + bound, 0.0f);
    if (lse_out != nullptr) {
      const bool any = total > 0.0f;
      lse_out[m] = any ? shift + std::log(total) : 0.0f;
      inv_sum[m] = any ? 1.0f / total : 0.0f;
    }
  }
}

int64_t BlockBound(const Dims& d, const Masks& mk, int64_t b, int64_t t0, int64_t r) {
  int64_t bound = 0;
  for (int64_t m = 0; m < r; ++m) bound = std::max(bound, KeyBound(d, mk, b, t0 + m));
  return bound;
}

ffi::Error CheckDims(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v,
                     ffi::Buffer<ffi::S32>& q_slot, ffi::Buffer<ffi::S32>& q_seg, ffi::Buffer<ffi::S32>& k_seg,
                     ffi::Buffer<ffi::S32>& k_limit, Dims* d) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 5 || kd.size() != 4 || vd.size() != 4) {
    return ffi::Error::InvalidArgument("train_attention: q must be [B, K, G, T, H], k and v [B, K, S, H]");
  }
  *d = Dims{qd[0], qd[1], qd[2], qd[3], kd[2], qd[4]};
  for (int64_t i = 0; i < 4; ++i) {
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("train_attention: k and v shapes differ");
  }
  if (kd[0] != d->rows || kd[1] != d->kv_heads || kd[3] != d->head_dim ||
      q_slot.element_count() != d->rows * d->queries || q_seg.element_count() != d->rows * d->queries ||
      k_seg.element_count() != d->rows * d->keys || k_limit.element_count() != d->rows) {
    return ffi::Error::InvalidArgument("train_attention: shapes of q, k, v and the mask descriptors disagree");
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_slot, ffi::Buffer<ffi::S32> q_seg,
                       ffi::Buffer<ffi::S32> k_seg, ffi::Buffer<ffi::S32> k_limit,
                       ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, float scale) {
  Dims d;
  if (auto err = CheckDims(q, k, v, q_slot, q_seg, k_seg, k_limit, &d); err.failure()) return err;
  const Masks mk{q_slot.typed_data(), q_seg.typed_data(), k_seg.typed_data(), k_limit.typed_data()};
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  const int64_t H = d.head_dim, S = d.keys, T = d.queries;

  apr_parallel::ForEachUnit(pool, d.rows * d.kv_heads, true, [&](int64_t u) {
    const int64_t b = u / d.kv_heads;
    const float* k_unit = kp + u * S * H;
    const float* v_unit = vp + u * S * H;
    thread_local std::vector<float> k_buf, v_buf, p_buf, i_buf;
    float* k_panels = Scratch(k_buf, Panels(S) * H * kPanel);
    float* v_panels = Scratch(v_buf, Panels(H) * S * kPanel);
    apr_tile::PackTransposed(k_unit, H, S, H, k_panels);  // K^T [H, S] as panels over keys
    apr_tile::PackColumns(v_unit, H, S, H, v_panels);     // V [S, H] as panels over head dims
    const int64_t ld = Panels(S) * kPanel;
    float* probs = Scratch(p_buf, kMaxRows * ld);
    float* inv_sum = Scratch(i_buf, kMaxRows);
    for (int64_t g = 0; g < d.groups; ++g) {
      const int64_t qg = (u * d.groups + g) * T;  // first query of this (row, kv head, group)
      for (int64_t t0 = 0; t0 < T; t0 += kMaxRows) {
        const int64_t r = std::min(kMaxRows, T - t0);
        const int64_t bound = BlockBound(d, mk, b, t0, r);
        float* o = op + (qg + t0) * H;
        Probabilities(d, mk, b, t0, r, qp + (qg + t0) * H, k_panels, bound, scale, probs, ld,
                      nullptr, lp + qg + t0, inv_sum);
        apr_tile::Multiply(probs, ld, r, bound, v_panels, S * kPanel, H, o, H, false);
        for (int64_t m = 0; m < r; ++m) {
          for (int64_t h = 0; h < H; ++h) o[m * H + h] *= inv_sum[m];
        }
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                        ffi::Buffer<ffi::F32> dout, ffi::Buffer<ffi::S32> q_slot, ffi::Buffer<ffi::S32> q_seg,
                        ffi::Buffer<ffi::S32> k_seg, ffi::Buffer<ffi::S32> k_limit,
                        ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv, float scale) {
  Dims d;
  if (auto err = CheckDims(q, k, v, q_slot, q_seg, k_seg, k_limit, &d); err.failure()) return err;
  const Masks mk{q_slot.typed_data(), q_seg.typed_data(), k_seg.typed_data(), k_limit.typed_data()};
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = out.typed_data(), *lp = lse.typed_data(), *dop = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  const int64_t H = d.head_dim, S = d.keys, T = d.queries;

  apr_parallel::ForEachUnit(pool, d.rows * d.kv_heads, true, [&](int64_t u) {
    const int64_t b = u / d.kv_heads;
    const float* k_unit = kp + u * S * H;
    const float* v_unit = vp + u * S * H;
    float* dk_unit = dkp + u * S * H;
    float* dv_unit = dvp + u * S * H;
    std::fill(dk_unit, dk_unit + S * H, 0.0f);
    std::fill(dv_unit, dv_unit + S * H, 0.0f);
    thread_local std::vector<float> kt_buf, vt_buf, k_buf, p_buf, dp_buf, q_buf, do_buf;
    float* kt_panels = Scratch(kt_buf, Panels(S) * H * kPanel);
    float* vt_panels = Scratch(vt_buf, Panels(S) * H * kPanel);
    float* k_panels = Scratch(k_buf, Panels(H) * S * kPanel);
    apr_tile::PackTransposed(k_unit, H, S, H, kt_panels);  // scores = Q K^T
    apr_tile::PackTransposed(v_unit, H, S, H, vt_panels);  // dP = dO V^T
    apr_tile::PackColumns(k_unit, H, S, H, k_panels);      // dQ = dS K
    const int64_t ld = Panels(S) * kPanel;
    float* probs = Scratch(p_buf, kBackwardRows * ld);
    float* dprobs = Scratch(dp_buf, kBackwardRows * ld);
    float* q_block = Scratch(q_buf, Panels(H) * kBackwardRows * kPanel);
    float* do_block = Scratch(do_buf, Panels(H) * kBackwardRows * kPanel);
    for (int64_t g = 0; g < d.groups; ++g) {
      const int64_t qg = (u * d.groups + g) * T;
      // Blocks of kBackwardRows queries: dS and P of the whole block feed dK and dV as one product each (a
      // deeper product than one tile's rows); dP, dS and dQ go tile by tile.
      for (int64_t b0 = 0; b0 < T; b0 += kBackwardRows) {
        const int64_t rows = std::min(kBackwardRows, T - b0);
        const int64_t bound = BlockBound(d, mk, b, b0, rows);
        if (bound == 0) {
          std::fill(dqp + (qg + b0) * H, dqp + (qg + b0 + rows) * H, 0.0f);
          continue;
        }
        for (int64_t t0 = b0; t0 < b0 + rows; t0 += kMaxRows) {
          const int64_t r = std::min(kMaxRows, b0 + rows - t0);
          const float* do_rows = dop + (qg + t0) * H;
          float* p = probs + (t0 - b0) * ld;
          float* ds = dprobs + (t0 - b0) * ld;
          Probabilities(d, mk, b, t0, r, qp + (qg + t0) * H, kt_panels, bound, scale, p, ld, lp + qg + t0,
                        nullptr, nullptr);
          apr_tile::Multiply(do_rows, H, r, H, vt_panels, H * kPanel, bound, ds, ld, false);
          for (int64_t m = 0; m < r; ++m) {  // dS = P * (dP - delta) * scale, in place of dP
            const float* o_row = op + (qg + t0 + m) * H;
            float delta = 0.0f;
            for (int64_t h = 0; h < H; ++h) delta += do_rows[m * H + h] * o_row[h];
            float* ds_row = ds + m * ld;
            const float* p_row = p + m * ld;
            for (int64_t s = 0; s < bound; ++s) ds_row[s] = p_row[s] * (ds_row[s] - delta) * scale;
          }
          apr_tile::Multiply(ds, ld, r, bound, k_panels, S * kPanel, H, dqp + (qg + t0) * H, H, false);
        }
        // dK[:bound] += dS^T Q, dV[:bound] += P^T dO: key rows read the block's columns (transposed tiles)
        apr_tile::PackColumns(qp + (qg + b0) * H, H, rows, H, q_block);
        apr_tile::PackColumns(dop + (qg + b0) * H, H, rows, H, do_block);
        apr_tile::Multiply<true>(dprobs, ld, bound, rows, q_block, rows * kPanel, H, dk_unit, H, true);
        apr_tile::Multiply<true>(probs, ld, bound, rows, do_block, rows * kPanel, H, dv_unit, H, true);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AprTrainAttentionForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_slot
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_seg
                                  .Arg<ffi::Buffer<ffi::S32>>()  // k_seg
                                  .Arg<ffi::Buffer<ffi::S32>>()  // k_limit
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AprTrainAttentionBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_slot
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_seg
                                  .Arg<ffi::Buffer<ffi::S32>>()  // k_seg
                                  .Arg<ffi::Buffer<ffi::S32>>()  // k_limit
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attr<float>("scale"));
