// Small-row matmul against a pre-packed weight, for decoding on CPU (an XLA FFI custom call).
//
// y[M, N] = x[M, K] @ W[K, N], with W packed once (outside the decode loop) into column panels
// [P, K, kPanel]: panel p holds columns p * kPanel ... of every row of W, contiguous, zero-padded past N.
// A decode step multiplies only M = rows (threads) <= a few dozen by each weight; XLA:CPU's generic dot
// reaches ~25-50 GFLOP/s there, while this register-blocked loop (an MR x kPanel tile of accumulators, one
// panel row loaded per k and reused by MR rows, the panel streamed in order) runs near the core's FMA rate
// (docs/inference.md). Panels are shared between the calling thread and XLA's intra-op pool.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int64_t kPanel = 32;   // two 16-float vectors
constexpr int64_t kMaxRows = 12;  // 24 accumulators + 2 panel vectors + 1 broadcast of 32 registers
#else
constexpr int64_t kPanel = 16;   // two 8-float vectors (AVX2) or four 4-float (SSE/NEON)
constexpr int64_t kMaxRows = 6;   // 12 accumulators of 16 registers
#endif
constexpr int64_t kHalf = kPanel / 2;
typedef float Vec __attribute__((vector_size(kHalf * sizeof(float))));

// Below this many multiply-adds per call, handing work to other threads costs more than it saves.
constexpr int64_t kParallelWork = 1 << 17;

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
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

// MR rows of x (stride k) times one packed panel [k, kPanel] -> columns [0, width) of MR rows of y.
template <int64_t MR>
void Tile(const float* __restrict x, int64_t k, const float* __restrict panel, float* __restrict y,
          int64_t ldy, int64_t width) {
  Vec lo[MR], hi[MR];
  for (int64_t m = 0; m < MR; ++m) lo[m] = hi[m] = Vec{};
  for (int64_t i = 0; i < k; ++i) {
    const Vec b0 = Load(panel + i * kPanel), b1 = Load(panel + i * kPanel + kHalf);
    for (int64_t m = 0; m < MR; ++m) {
      const float a = x[m * k + i];
      lo[m] += a * b0;
      hi[m] += a * b1;
    }
  }
  for (int64_t m = 0; m < MR; ++m) {
    Store(y + m * ldy, lo[m], width);
    Store(y + m * ldy + kHalf, hi[m], width - kHalf);
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t);

TileFn SelectTile(int64_t rows) {
#if defined(__AVX512F__)
  static constexpr TileFn table[] = {Tile<1>, Tile<2>, Tile<3>, Tile<4>, Tile<5>,  Tile<6>,
                                     Tile<7>, Tile<8>, Tile<9>, Tile<10>, Tile<11>, Tile<12>};
#else
  static constexpr TileFn table[] = {Tile<1>, Tile<2>, Tile<3>, Tile<4>, Tile<5>, Tile<6>};
#endif
  return table[rows - 1];
}

ffi::Error PackedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();  // [M, K]
  auto wd = w.dimensions();  // [P, K, kPanel]
  auto yd = y->dimensions();  // [M, N]
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2) {
    return ffi::Error::InvalidArgument("packed_matmul: x must be [M, K], w [P, K, panel] and y [M, N]");
  }
  const int64_t rows = xd[0], depth = xd[1], panels = wd[0], cols = yd[1];
  if (wd[1] != depth || wd[2] != kPanel || yd[0] != rows || cols > panels * kPanel ||
      cols <= (panels - 1) * kPanel) {
    return ffi::Error::InvalidArgument("packed_matmul: shapes of x, the packed weight and y do not agree");
  }
  if (rows == 0 || cols == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();

  // Row blocks of (nearly) equal size <= kMaxRows; one work unit = one panel for every row block, so each
  // panel is read from memory once and reused from cache by the other row blocks.
  const int64_t blocks = (rows + kMaxRows - 1) / kMaxRows;
  const int64_t block_rows = (rows + blocks - 1) / blocks;
  auto run_panel = [=](int64_t p) {
    const float* panel = wp + p * depth * kPanel;
    const int64_t width = std::min<int64_t>(kPanel, cols - p * kPanel);
    for (int64_t r0 = 0; r0 < rows; r0 += block_rows) {
      const int64_t r = std::min<int64_t>(block_rows, rows - r0);
      SelectTile(r)(xp + r0 * depth, depth, panel, yp + r0 * cols + p * kPanel, cols, width);
    }
  };

  // Work sharing as in decode_attention.cc: the caller and up to num_threads pool tasks take panels from
  // one counter; the caller waits only for panels already taken.
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [=](Shared& st) {
    for (int64_t p = st.next.fetch_add(1); p < panels; p = st.next.fetch_add(1)) {
      run_panel(p);
      st.done.fetch_add(1, std::memory_order_release);
    }
  };
  if (rows * depth * cols >= kParallelWork) {
    const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, panels - 1);
    for (int64_t h = 0; h < helpers; ++h) pool.Schedule([shared, work] { work(*shared); });
  }
  work(*shared);
  while (shared->done.load(std::memory_order_acquire) < panels) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

// The panel width the kernel was compiled for (the packed layout depends on it).
extern "C" int64_t AprPackedPanelWidth() { return kPanel; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(AprPackedMatmul, PackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
