// The loops for AVX-512 (x86-64 with AVX512F): 32 zmm registers of 16 floats.
// Register tile 8 x 32 floats (MR = 8 rows, NV = 2 vectors): 16 accumulators, 2 vectors of B
// and one broadcast of A live at once, 19 of the 32 registers.
#include "chain.h"

#if defined(__x86_64__)
#pragma GCC target("avx512f,avx2,fma")
#include "loops.h"

namespace {
struct Avx512 {
  static constexpr int VL = 16, MR = 8, NV = 2;
};
}  // namespace

const mogrifier_chain::Kernels& mogrifier_chain::avx512_kernels() {
  static const Kernels kernels = Loops<Avx512>::kernels("avx512");
  return kernels;
}
#endif
