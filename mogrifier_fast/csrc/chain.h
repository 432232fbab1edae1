// The interface between the bindings (bindings.cpp: tensors, checks, op registration) and the
// time loops of backend "fused" (loops.h, compiled once per instruction set by the isa_*.cpp
// files). Plain pointers and sizes only: nothing here or below it includes ATen.
//
// The standard headers the loops use are included here, before any isa_*.cpp file switches its
// target: templates from them keep the default target in every file, so no copy compiled for a
// wider instruction set can be chosen by the linker for code that runs on a narrower one.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

namespace mogrifier_chain {

// A (T, B, width) buffer whose last dimension is contiguous: element (t, b, 0) at
// base + t step + b row. step = 0 when one block serves every step (inference keeps nothing).
// A packed batch's rows, step after step: element (t, b, 0) at base + (first[t] + b) row.
struct Seq {
  float* base = nullptr;
  int64_t step = 0, row = 0;
  const int64_t* first = nullptr;
  float* at(int64_t t, int64_t b) const {
    return base + (first != nullptr ? first[t] * row : t * step) + b * row;
  }
};

// A parameter as stored: row-major (rows, cols), rows ld apart.
struct Matrix {
  const float* data = nullptr;
  int64_t rows = 0, cols = 0, ld = 0;
};

// Round j's map: dense W (out, in), or low rank W = A B with A (out, k), B (k, in); its bias
// (or null); and the power of two its input carries (the doublings of the earlier rounds).
struct RoundMap {
  Matrix factor[2];
  int factors = 1;
  const float* bias = nullptr;
  float scale = 1.0f;
};

// One layer-direction's parameters as stored, with the powers of two the gate product's
// x and h halves carry. The hidden state is P = state_size wide: H, or with a projection
// w_hr (P, H) (nn.LSTM's proj_size) h = (σ(o) tanh(c)) w_hr^T.
struct Params {
  int64_t input_size = 0, hidden_size = 0, state_size = 0, rounds = 0;
  Matrix w_ih, w_hh;                                // (4H, I), (4H, P)
  Matrix w_hr;                                      // (P, H), or data null
  const float* b_ih = nullptr;                      // (4H) or null
  const float* b_hh = nullptr;                      // (4H) or null
  float scale_x = 1.0f, scale_h = 1.0f;
  const RoundMap* maps = nullptr;                   // one per round
};

// What the forward keeps for the backward (fused.py's _Saved), each (T, B, .), or one block
// each (cells2: two, used in turn) under inference. states[s - 1] holds u_s, 1 <= s <= r - 2;
// inners[j - 1], a low-rank round's inner value (base null when dense); sig[j - 1] = σ(z_j);
// unprojected, σ(o) tanh(c) before the projection (base null without one); h_in, the masked
// state each step reads, mask ⊙ h_{t-1} (base null without a state mask).
struct Saved {
  Seq xh, act, tanh_g2, tanh_c, cells2;
  const Seq* states = nullptr;
  const Seq* inners = nullptr;
  const Seq* sig = nullptr;
  Seq unprojected, h_in;
};

// How the loops run: threads in the team, each running its own batch rows (split_rows) or a
// share of every product's columns, and whether the weights are packed into panels first
// (fast over many steps) or read where they are (no copy: a few steps).
struct Plan {
  int threads = 1;
  bool split_rows = false;
  bool packed = true;
};

// What the forward and the backward of one layer-direction's call both read. A packed batch
// runs batch_sizes[t] <= B rows at step t, the first ones (sequences sorted longest first);
// batch_sizes is null when every step runs all B rows. With a state mask (B, P), every step
// reads mask ⊙ h_{t-1} (variational state dropout), kept in saved.h_in.
struct Call {
  const Params* params;
  int64_t steps, rows;
  Seq x;                          // (T, B, I)
  const float* h0;                // (B, H), contiguous
  Seq output;                     // (T, B, H): the forward's result, the backward's input
  Saved saved;
  Plan plan;
  const int64_t* batch_sizes = nullptr;
  const float* state_mask = nullptr;  // (B, P), contiguous, or null
  int64_t active(int64_t t) const { return batch_sizes != nullptr ? batch_sizes[t] : rows; }
  // How many steps sequence b runs.
  int64_t length(int64_t b) const {
    int64_t t = 0;
    while (t < steps && active(t) > b) ++t;
    return t;
  }
};

struct ForwardArgs {
  Call call;
  const float* c0;                // (B, H), contiguous
  float* c_last;                  // (B, H), contiguous
  bool keep;
};

struct BackwardArgs {
  Call call;
  Seq grad_output;                // (T, B, H)
  const float* grad_h;            // (B, H), contiguous
  const float* grad_c;            // (B, H), contiguous
  Seq grad_x;                     // (T, B, I)
  float* grad_h0;                 // (B, H), contiguous
  float* grad_c0;                 // (B, H), contiguous
  Seq grad_act;                   // (T, B, 4H)
  const Seq* grad_z;              // per round (T, B, width of u_j)
  const Seq* grad_inners;         // per round (T, B, k), base null when dense
  Seq grad_projected;             // (T, B, P): dh of the projected h; base null without one
};

// c (m, ldc >= n rounded up to whole vectors) = scale · a^T b over R rows: a (R, m), b (R, n),
// rows lda and ldb apart, elements contiguous. Columns of c past n are scratch.
struct RowsProductArgs {
  const float* a;
  const float* b;
  int64_t lda, ldb, R, m, n;
  float* c;
  int64_t ldc;
  float scale;
  int threads;
};

// One instruction set's loops: the row of the dispatch table in bindings.cpp.
struct Kernels {
  const char* name;
  int vector_width;  // floats per vector: the loops pad their column blocks to a multiple
  void (*forward)(const ForwardArgs&);
  void (*backward)(const BackwardArgs&);
  void (*rows_product)(const RowsProductArgs&);
};

// Defined by the isa_*.cpp files that this machine's architecture compiles.
const Kernels& avx512_kernels();
const Kernels& avx2_kernels();
const Kernels& generic_kernels();
const Kernels& neon_kernels();

}  // namespace mogrifier_chain
