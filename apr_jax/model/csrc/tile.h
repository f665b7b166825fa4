// Register-blocked matmul tiles against column panels, shared by the CPU kernels.
//
// A panel holds kPanel columns of a [depth, N] right-hand side, row after row: panel[i * kPanel + j] is
// column j of row i. Tile<MR> multiplies MR rows of the left-hand side by one panel, keeping the MR x kPanel
// results in registers, loading each panel row once and reusing it for all MR rows (GCC vector extensions:
// AVX-512 with -march=native on such CPUs, narrower vectors elsewhere).

#ifndef APR_JAX_TILE_H_
#define APR_JAX_TILE_H_

#include <cstdint>
#include <cstring>

namespace apr_tile {

#if defined(__AVX512F__)
constexpr int64_t kPanel = 32;    // two 16-float vectors
constexpr int64_t kMaxRows = 12;  // 24 accumulators + 2 panel vectors + 1 broadcast of 32 registers
#else
constexpr int64_t kPanel = 16;  // two 8-float vectors (AVX2) or four 4-float (SSE/NEON)
constexpr int64_t kMaxRows = 6;  // 12 accumulators of 16 registers
#endif
constexpr int64_t kHalf = kPanel / 2;
typedef float Vec __attribute__((vector_size(kHalf * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

inline Vec LoadPartial(const float* p, int64_t count) {  // the first `count` lanes, the rest 0
  if (count >= kHalf) return Load(p);
  float lanes[kHalf] = {};
  if (count > 0) std::memcpy(lanes, p, count * sizeof(float));
  Vec v;
  std::memcpy(&v, lanes, sizeof(Vec));
  return v;
}

inline void Store(float* p, const Vec& v, int64_t count) {  // the first `count` lanes (<= kHalf)
  if (count >= kHalf) {
    std::memcpy(p, &v, sizeof(Vec));
  } else if (count > 0) {
    float lanes[kHalf];
    std::memcpy(lanes, &v, sizeof(Vec));
    std::memcpy(p, lanes, count * sizeof(float));
  }
}

// y[m, 0:width] (+)= sum_i x(m, i) * panel[i, 0:width] for m < MR, i < depth, where x(m, i) is
// x[m * ldx + i] (rows of x contiguous) or, with kTransposed, x[i * ldx + m] (x stored depth-major).
template <int64_t MR, bool kTransposed = false>
void Tile(const float* __restrict x, int64_t ldx, int64_t depth, const float* __restrict panel,
          float* __restrict y, int64_t ldy, int64_t width, bool accumulate) {
  Vec lo[MR], hi[MR];
  for (int64_t m = 0; m < MR; ++m) {
    if (accumulate) {
      lo[m] = LoadPartial(y + m * ldy, width);
      hi[m] = LoadPartial(y + m * ldy + kHalf, width - kHalf);
    } else {
      lo[m] = hi[m] = Vec{};
    }
  }
  for (int64_t i = 0; i < depth; ++i) {
    // ask for the panel rows 16 iterations (2 KB) ahead: with many rows the loads alone do not keep enough
    // cache misses in flight (~9% off a 10-row decode step, docs/inference.md)
    __builtin_prefetch(panel + (i + 16) * kPanel);
    if (kPanel * sizeof(float) > 64) __builtin_prefetch(panel + (i + 16) * kPanel + kHalf);  // 2nd cache line
    const Vec b0 = Load(panel + i * kPanel), b1 = Load(panel + i * kPanel + kHalf);
    for (int64_t m = 0; m < MR; ++m) {
      const float a = kTransposed ? x[i * ldx + m] : x[m * ldx + i];
      lo[m] += a * b0;
      hi[m] += a * b1;
    }
  }
  for (int64_t m = 0; m < MR; ++m) {
    Store(y + m * ldy, lo[m], width);
    Store(y + m * ldy + kHalf, hi[m], width - kHalf);
  }
}

using TileFn = void (*)(const float*, int64_t, int64_t, const float*, float*, int64_t, int64_t, bool);

// Tile<rows> for 1 <= rows <= kMaxRows.
template <bool kTransposed = false>
TileFn SelectTile(int64_t rows) {
#if defined(__AVX512F__)
  static constexpr TileFn table[] = {
      Tile<1, kTransposed>, Tile<2, kTransposed>, Tile<3, kTransposed>,  Tile<4, kTransposed>,
      Tile<5, kTransposed>, Tile<6, kTransposed>, Tile<7, kTransposed>,  Tile<8, kTransposed>,
      Tile<9, kTransposed>, Tile<10, kTransposed>, Tile<11, kTransposed>, Tile<12, kTransposed>};
#else
  static constexpr TileFn table[] = {Tile<1, kTransposed>, Tile<2, kTransposed>, Tile<3, kTransposed>,
                                     Tile<4, kTransposed>, Tile<5, kTransposed>, Tile<6, kTransposed>};
#endif
  return table[rows - 1];
}

// y[rows, cols] (+)= x[rows, depth] @ W[depth, cols] (y row-major with stride ldy; x as in Tile), where W is
// given as ceil(cols / kPanel) panels of `panel_stride` floats each; rows go in near-equal tiles.
template <bool kTransposed = false>
void Multiply(const float* x, int64_t ldx, int64_t rows, int64_t depth, const float* panels, int64_t panel_stride,
              int64_t cols, float* y, int64_t ldy, bool accumulate) {
  if (rows <= 0 || cols <= 0) return;
  const int64_t tiles = (rows + kMaxRows - 1) / kMaxRows;
  const int64_t tile_rows = (rows + tiles - 1) / tiles;
  for (int64_t p = 0; p * kPanel < cols; ++p) {
    const int64_t width = cols - p * kPanel < kPanel ? cols - p * kPanel : kPanel;
    for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
      const int64_t r = rows - r0 < tile_rows ? rows - r0 : tile_rows;
      const float* xr = kTransposed ? x + r0 : x + r0 * ldx;
      if (depth == 0) {
        if (!accumulate) {
          for (int64_t m = 0; m < r; ++m) std::memset(y + (r0 + m) * ldy + p * kPanel, 0, width * sizeof(float));
        }
        continue;
      }
      SelectTile<kTransposed>(r)(xr, ldx, depth, panels + p * panel_stride, y + r0 * ldy + p * kPanel, ldy,
                                 width, accumulate);
    }
  }
}

// Packs rows [0, depth) of a row-major matrix m[depth, cols] (stride ld) as column panels
// [ceil(cols / kPanel), depth, kPanel], zero-padded; `out` must hold that many floats.
inline void PackColumns(const float* m, int64_t ld, int64_t depth, int64_t cols, float* out) {
  for (int64_t p = 0; p * kPanel < cols; ++p) {
    const int64_t width = cols - p * kPanel < kPanel ? cols - p * kPanel : kPanel;
    float* panel = out + p * depth * kPanel;
    for (int64_t i = 0; i < depth; ++i) {
      std::memcpy(panel + i * kPanel, m + i * ld + p * kPanel, width * sizeof(float));
      if (width < kPanel) std::memset(panel + i * kPanel + width, 0, (kPanel - width) * sizeof(float));
    }
  }
}

// Packs the transpose of m[rows, cols] (stride ld), i.e. a [cols, rows] matrix, as column panels
// [ceil(rows / kPanel), cols, kPanel], zero-padded.
inline void PackTransposed(const float* m, int64_t ld, int64_t rows, int64_t cols, float* out) {
  for (int64_t p = 0; p * kPanel < rows; ++p) {
    const int64_t width = rows - p * kPanel < kPanel ? rows - p * kPanel : kPanel;
    float* panel = out + p * cols * kPanel;
    for (int64_t j = 0; j < width; ++j) {
      const float* row = m + (p * kPanel + j) * ld;
      for (int64_t i = 0; i < cols; ++i) panel[i * kPanel + j] = row[i];
    }
    for (int64_t j = width; j < kPanel; ++j) {
      for (int64_t i = 0; i < cols; ++i) panel[i * kPanel + j] = 0.0f;
    }
  }
}

inline int64_t Panels(int64_t cols) { return (cols + kPanel - 1) / kPanel; }

}  // namespace apr_tile

#endif  // APR_JAX_TILE_H_
