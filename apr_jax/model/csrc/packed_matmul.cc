// Small-row matmul against a pre-packed weight, for decoding on CPU (an XLA FFI custom call).
//
// y[M, N] = x[M, K] @ W[K, N], with W packed once (outside the decode loop) into column panels
// [P, K, kPanel]: panel p holds columns p * kPanel ... of every row of W, contiguous, zero-padded past N.
// A decode step multiplies only M = rows (threads) <= a few dozen by each weight; XLA:CPU's generic dot
// reaches ~25-50 GFLOP/s there, while this register-blocked loop (an MR x kPanel tile of accumulators, one
// panel row loaded per k and reused by MR rows, the panel streamed in order) runs near the core's FMA rate
// (docs/inference.md). Panels are shared between the calling thread and XLA's intra-op pool.

#include <algorithm>
#include <cstdint>

#include "parallel.h"
#include "tile.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using apr_tile::kMaxRows;
using apr_tile::kPanel;

// Below this many multiply-adds per call, handing work to other threads costs more than it saves.
constexpr int64_t kParallelWork = 1 << 17;

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
      apr_tile::SelectTile(r)(xp + r0 * depth, depth, depth, panel, yp + r0 * cols + p * kPanel, cols, width,
                              false);
    }
  };

  apr_parallel::ForEachUnit(pool, panels, rows * depth * cols >= kParallelWork, run_panel);
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
