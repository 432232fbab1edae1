// The loops for AVX2 with FMA (x86-64 since Haswell and Zen): 16 ymm registers of 8 floats.
// Register tile 6 x 16 floats (MR = 6 rows, NV = 2 vectors): 12 accumulators, 2 vectors of B
// and one broadcast of A live at once, 15 of the 16 registers. A row's last, partial vector is
// read with a masked load (vmaskmovps: no access past the row).
#include "chain.h"

#if defined(__x86_64__)
#include <immintrin.h>
#pragma GCC target("avx2,fma")
#include "loops.h"

namespace {
struct Avx2 {
  static constexpr int VL = 8, MR = 6, NV = 2;
  // The first n < 8 floats at p, the other lanes zero.
  static __m256 load_partial(const float* p, int64_t n) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), lanes));
  }
};
}  // namespace

const mogrifier_chain::Kernels& mogrifier_chain::avx2_kernels() {
  static const Kernels kernels = Loops<Avx2>::kernels("avx2");
  return kernels;
}
#endif
