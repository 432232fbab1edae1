// The loops for ARM64 (AdvSIMD, present on every AArch64 CPU): 32 q registers of 4 floats.
// Register tile 6 x 12 floats (MR = 6 rows, NV = 3 vectors): 18 accumulators and 3 vectors of B;
// GCC loads the tile's 6 values of A into registers of their own first, so 27 of the 32 are
// live (an 8 x 12 tile needs 35: GCC 12 kept 4 of its accumulators on the stack).
#include "chain.h"

#if defined(__aarch64__)
#include "loops.h"

namespace {
struct Neon {
  static constexpr int VL = 4, MR = 6, NV = 3;
};
}  // namespace

const mogrifier_chain::Kernels& mogrifier_chain::neon_kernels() {
  static const Kernels kernels = Loops<Neon>::kernels("neon");
  return kernels;
}
#endif
