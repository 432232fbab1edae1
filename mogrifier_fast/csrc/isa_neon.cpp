// The loops for ARM64 (AdvSIMD, present on every AArch64 CPU): 32 q registers of 4 floats.
// Register tile 8 x 12 floats (MR = 8 rows, NV = 3 vectors): 24 accumulators, 3 vectors of B
// and one broadcast of A live at once, 28 of the 32 registers.
#include "chain.h"

#if defined(__aarch64__)
#include "loops.h"

namespace {
struct Neon {
  static constexpr int VL = 4, MR = 8, NV = 3;
};
}  // namespace

const mogrifier_chain::Kernels& mogrifier_chain::neon_kernels() {
  static const Kernels kernels = Loops<Neon>::kernels("neon");
  return kernels;
}
#endif
