// The portable loops: 4-float vectors, which every compiler target has (SSE2 on x86-64, AdvSIMD
// on ARM64, scalar code elsewhere), built with the architecture's baseline instructions only.
// Register tile 6 x 8 floats (MR = 6 rows, NV = 2 vectors): 12 accumulators, 2 vectors of B and
// one broadcast of A live at once, 15 of x86-64's 16 xmm registers.
#include "chain.h"
#include "loops.h"

namespace {
struct Generic {
  static constexpr int VL = 4, MR = 6, NV = 2;
};
}  // namespace

const mogrifier_chain::Kernels& mogrifier_chain::generic_kernels() {
  static const Kernels kernels = Loops<Generic>::kernels("generic");
  return kernels;
}
