// The loops for AVX2 with FMA (x86-64 since Haswell and Zen): 16 ymm registers of 8 floats.
// Register tile 6 x 16 floats (MR = 6 rows, NV = 2 vectors): 12 accumulators, 2 vectors of B
// and one broadcast of A live at once, 15 of the 16 registers.
#include "chain.h"

#if defined(__x86_64__)
#pragma GCC target("avx2,fma")
#include "loops.h"

namespace {
struct Avx2 {
  static constexpr int VL = 8, MR = 6, NV = 2;
};
}  // namespace

const mogrifier_chain::Kernels& mogrifier_chain::avx2_kernels() {
  static const Kernels kernels = Loops<Avx2>::kernels("avx2");
  return kernels;
}
#endif
