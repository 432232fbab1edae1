// The two time loops of the "fused" backend and its weight-gradient products, for float32 on
// CPU (see backends/fused_chain.py).
//
// The math and the buffers are those of backends/fused.py: the weights arrive folded there
// (doublings moved into the weights, g rows doubled), and the loops fill the same saved buffers
// and gradient buffers its Python loops fill. What differs is how a step runs:
//
// * Products by a small register-blocked kernel on weights packed once per call into panels of
//   16 columns (K x 16 contiguous, zero-padded): 8 rows x 32 columns of accumulators, the
//   weight read once per row tile. No per-call library overhead, which at these sizes (16-32
//   rows) costs more than the arithmetic. The same tile forms the weight gradients, reading
//   both operands in place.
// * Pointwise work on 16-wide vectors right after the product, on the columns just computed,
//   by the thread that computed them (sigmoid through a polynomial exp, as accurate as expf).
// * One OpenMP team for the whole sequence (see Part): each thread runs the recurrence on its
//   own batch rows, with no barrier, or takes a share of each product's columns, with a
//   barrier between dependent phases.
//
// Written with GCC vector extensions, so it compiles to AVX-512, AVX2 or SSE as the machine has.

#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

namespace {

constexpr int64_t L = 16;  // floats per vector, and columns per panel
using vec = float __attribute__((vector_size(64)));
using ivec = int32_t __attribute__((vector_size(64)));

inline int64_t round_up(int64_t n) { return (n + L - 1) / L * L; }
inline int team_size(int64_t threads) { return static_cast<int>(std::max<int64_t>(1, threads)); }
// Every lane a (written out: vec{} + a would add +0.0, which is not free for a = -0.0).
inline vec splat(float a) { return vec{a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a}; }
// n < L: the first n lanes (the rest zero on load, untouched on store).
inline vec load(const float* p, int64_t n = L) {
  vec v = {};
  if (n == L)
    std::memcpy(&v, p, sizeof v);
  else
    std::memcpy(&v, p, n * sizeof(float));
  return v;
}
inline void store(float* p, vec v, int64_t n = L) {
  if (n == L)
    std::memcpy(p, &v, sizeof v);
  else
    std::memcpy(p, &v, n * sizeof(float));
}

// exp by range reduction to [-ln2/2, ln2/2] and a degree-6 polynomial (about 1 ulp); inputs
// clamped to where 2^n stays a normal float; NaN passes through.
inline vec exp_v(vec x) {
  x = x > 88.0f ? splat(88.0f) : x;
  x = x < -87.0f ? splat(-87.0f) : x;
  const vec n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  vec r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
inline vec sigmoid_v(vec x) { return 1.0f / (1.0f + exp_v(-x)); }

// A matrix B (K, N) as the right operand of C = A B, in panels of L columns: panel p holds
// B[k][pL .. pL+L) for every k, contiguous. Columns come in blocks (the four gates, or the x and
// h halves of [x, h]), each zero-padded to a multiple of L, so every block starts a panel.
struct Panels {
  at::Tensor data;  // (panels, K, L)
  int64_t K = 0;
  std::vector<int64_t> widths, first_panel;

  Panels(const at::Tensor& b, std::vector<int64_t> block_widths, int threads)
      : widths(std::move(block_widths)) {
    K = b.size(0);
    int64_t panels = 0;
    for (int64_t w : widths) {
      first_panel.push_back(panels);
      panels += round_up(w) / L;
    }
    data = at::empty({panels, K, L}, b.options());
    auto src = b.accessor<float, 2>();
    float* dst = data.data_ptr<float>();
    const bool by_column = b.stride(0) == 1;  // read along the rows of a transposed weight
    int64_t column = 0;
    for (size_t block = 0; block < widths.size(); ++block) {
      const int64_t width = widths[block];
#pragma omp parallel for num_threads(threads) if (K * width >= (1 << 16))
      for (int64_t q = 0; q < round_up(width) / L; ++q) {
        float* panel = dst + (first_panel[block] + q) * K * L;
        const int64_t n0 = q * L, n1 = std::min(width, n0 + L);
        if (by_column) {
          for (int64_t n = n0; n < n1; ++n)
            for (int64_t k = 0; k < K; ++k) panel[k * L + n - n0] = src[k][column + n];
        } else {
          for (int64_t k = 0; k < K; ++k)
            for (int64_t n = n0; n < n1; ++n) panel[k * L + n - n0] = src[k][column + n];
        }
        if (n1 - n0 < L)  // the block's last panel: zeros past its width
          for (int64_t k = 0; k < K; ++k)
            std::fill(panel + k * L + (n1 - n0), panel + (k + 1) * L, 0.0f);
      }
      column += width;
    }
  }
  int64_t panels() const { return data.size(0); }
  int64_t padded_width() const { return panels() * L; }
  const float* panel(int64_t p) const { return data.data_ptr<float>() + p * K * L; }
};

// The register tile of every product here: C[0:MR, 0:NV L] (+)= sum over k < K of A(i, k) B(k, .)
// with A(i, k) = a[i a_row + k a_k] and the row k of B's vector v at b + k b_k + v b_v; rows of C
// ldc apart. Packed panels (b_k = L, b_v = K L) serve the time loops, plain rows (b_k = ldb,
// b_v = L) the weight gradients.
struct Operands {
  const float* a;
  int64_t a_row, a_k;
  const float* b;
  int64_t b_k, b_v, K;
};

template <int MR, int NV>
inline void tile(const Operands& o, float* c, int64_t ldc, bool accumulate) {
  vec acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = accumulate ? load(c + i * ldc + v * L) : vec{};
  const float* a = o.a;
  const float* b = o.b;
  for (int64_t k = 0; k < o.K; ++k, a += o.a_k, b += o.b_k) {
    vec bk[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bk[v] = load(b + v * o.b_v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const vec ai = splat(a[i * o.a_row]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += ai * bk[v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(c + i * ldc + v * L, acc[i][v]);
}

// Rows [0, rows) of C, NV vectors wide, in tiles of up to 8 rows.
template <int NV>
void row_tiles(Operands o, int64_t rows, float* c, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + 8 <= rows; i += 8, o.a += 8 * o.a_row) tile<8, NV>(o, c + i * ldc, ldc, accumulate);
  c += i * ldc;
  switch (rows - i) {
    case 7: return tile<7, NV>(o, c, ldc, accumulate);
    case 6: return tile<6, NV>(o, c, ldc, accumulate);
    case 5: return tile<5, NV>(o, c, ldc, accumulate);
    case 4: return tile<4, NV>(o, c, ldc, accumulate);
    case 3: return tile<3, NV>(o, c, ldc, accumulate);
    case 2: return tile<2, NV>(o, c, ldc, accumulate);
    case 1: return tile<1, NV>(o, c, ldc, accumulate);
    default: return;
  }
}

// Vectors [v0, v1) of C's rows [0, rows), with o.b at vector 0.
void tiles(Operands o, int64_t rows, int64_t v0, int64_t v1, float* c, int64_t ldc,
           bool accumulate) {
  const float* b = o.b;
  int64_t v = v0;
  for (; v + 2 <= v1; v += 2) {
    o.b = b + v * o.b_v;
    row_tiles<2>(o, rows, c + v * L, ldc, accumulate);
  }
  if (v < v1) {
    o.b = b + v * o.b_v;
    row_tiles<1>(o, rows, c + v * L, ldc, accumulate);
  }
}

// Columns [p0 L, p1 L) of C (rows, padded width) (+)= A (rows, K; rows lda apart) B.
void gemm(const float* a, int64_t lda, int64_t rows, const Panels& b, int64_t p0, int64_t p1,
          float* c, int64_t ldc, bool accumulate) {
  tiles({a, lda, 1, b.panel(0), L, b.K * L, b.K}, rows, p0, p1, c, ldc, accumulate);
}

// This thread's share [begin, end) of n items split over the team.
struct Share {
  int64_t begin, end;
  Share(int64_t n, int thread, int threads)
      : begin(n * thread / threads), end(n * (thread + 1) / threads) {}
  Share(int64_t begin_, int64_t end_) : begin(begin_), end(end_) {}
};

// A thread's part of the time loops. Split by columns, every thread takes all rows and a share of
// each product's columns, with a barrier between dependent phases. Split by rows (blocks of 8),
// each thread runs the whole recurrence on its own rows, which never mix: no barrier at all, but
// every thread reads all the weights each step (fast while they stay in its core's cache).
struct Part {
  int64_t row_begin = 0, row_end = 0;
  int thread = 0, team = 1;

  Part(int64_t rows, bool split_rows) {
    const int id = omp_get_thread_num(), size = omp_get_num_threads();
    if (split_rows) {
      const Share tiles((rows + 7) / 8, id, size);
      row_begin = std::min(tiles.begin * 8, rows);
      row_end = std::min(tiles.end * 8, rows);
    } else {
      row_end = rows;
      thread = id;
      team = size;
    }
  }
  int64_t rows() const { return row_end - row_begin; }
  // This thread's share of n column panels (or units).
  Share columns(int64_t n) const { return Share(n, thread, team); }
  // This thread's share of the rows for work split by rows within a phase.
  Share own_rows() const {
    const Share share(rows(), thread, team);
    return {row_begin + share.begin, row_begin + share.end};
  }
  // Wait for the threads that share this thread's rows.
  void sync() const {
    if (team > 1) {
#pragma omp barrier
    }
  }
};

// A (T, B, width) tensor whose last dimension is contiguous; step 0 when one block serves every
// step (inference keeps nothing over time).
struct Sequence {
  float* base = nullptr;
  int64_t step = 0, row = 0;
  Sequence() = default;
  Sequence(const at::Tensor& t, bool over_time = true)
      : base(t.data_ptr<float>()), step(over_time ? t.stride(0) : 0), row(t.stride(1)) {
    TORCH_CHECK(t.stride(2) == 1, "fused_chain: a buffer's last dimension must be contiguous");
  }
  float* at(int64_t t, int64_t b) const { return base + t * step + b * row; }
};

// The states u_s, s = -1 (the input) .. r, of every step, where fused.py keeps them.
struct States {
  int64_t rounds, input_size, hidden_size, x_final, h_final;
  Sequence x, output, xh, h0;
  std::vector<Sequence> kept;  // kept[s], 1 <= s <= r - 2

  States(const at::Tensor& x_, const at::Tensor& h0_, const at::Tensor& output_,
         const at::Tensor& xh_, at::TensorList states, int64_t rounds_, bool keep)
      : rounds(rounds_), input_size(x_.size(2)), hidden_size(h0_.size(1)), x(x_),
        output(output_), xh(xh_, keep), h0(h0_.unsqueeze(0)) {
    x_final = rounds % 2 ? rounds : rounds - 1;
    h_final = rounds % 2 ? rounds - 1 : rounds;
    kept.resize(std::max<int64_t>(rounds - 1, 1));
    for (int64_t s = 1; s + 1 < rounds; ++s) kept[s] = Sequence(states[s - 1], keep);
  }
  int64_t width(int64_t s) const { return s % 2 ? input_size : hidden_size; }
  // State s at step t: its first row, and the distance between its rows.
  struct Rows {
    float* first;
    int64_t ld;
  };
  Rows rows(int64_t s, int64_t t) const {
    if (s == -1) return {x.at(t, 0), x.row};
    if (s == 0) return t == 0 ? Rows{h0.at(0, 0), h0.row} : Rows{output.at(t - 1, 0), output.row};
    if (s == x_final) return {xh.at(t, 0), xh.row};
    if (s == h_final) return {xh.at(t, 0) + input_size, xh.row};
    return {kept[s].at(t, 0), kept[s].row};
  }
  float* at(int64_t s, int64_t t, int64_t b) const {
    const Rows r = rows(s, t);
    return r.first + b * r.ld;
  }
};

// A low-rank map's first product of this thread's rows, in (rows, lda apart) -> (rows, k): this
// thread's columns of it stored at step t of `inner`, then a barrier. Returns the whole value's
// rows (and their distance in lda): the input of the map's second product.
const float* inner_value(const Part& part, const float* in, int64_t& lda, const Panels& map,
                         float* scratch, int64_t scratch_width, const Sequence& inner, int64_t t) {
  const Share share = part.columns(map.panels());
  gemm(in, lda, part.rows(), map, share.begin, share.end, scratch + part.row_begin * scratch_width,
       scratch_width, false);
  const int64_t c1 = std::min(share.end * L, map.widths[0]);
  for (int64_t b = part.row_begin; b < part.row_end; ++b)
    for (int64_t c = share.begin * L; c < c1; c += L)
      store(inner.at(t, b) + c, load(scratch + b * scratch_width + c), std::min(L, c1 - c));
  part.sync();
  lda = inner.row;
  return inner.at(t, part.row_begin);
}

// Round j's map as products: dense [W], or low rank [B, A] (W = A B), bias on the last.
struct RoundMaps {
  std::vector<Panels> products;
  const float* bias = nullptr;
};

// The forward's products (with the rounds' biases), or the backward's (biases null).
std::vector<RoundMaps> round_maps(at::TensorList weights, c10::IntArrayRef factors,
                                  const c10::List<std::optional<at::Tensor>>* biases,
                                  int threads) {
  const bool backward = biases == nullptr;
  std::vector<RoundMaps> maps;
  size_t next = 0;
  for (size_t j = 0; j < factors.size(); ++j) {
    RoundMaps m;
    std::vector<at::Tensor> f(weights.begin() + next, weights.begin() + next + factors[j]);
    next += factors[j];
    if (backward) {  // dz -> dz W: dense [W (out, in)], low rank [A (out, k), B (k, in)]
      for (const auto& w : f)
        m.products.emplace_back(w, std::vector<int64_t>{w.size(1)}, threads);
    } else {  // u -> u W^T: dense [W^T], low rank [B^T then A^T]
      for (auto it = f.rbegin(); it != f.rend(); ++it)
        m.products.emplace_back(it->t(), std::vector<int64_t>{it->size(0)}, threads);
    }
    if (!backward) {
      const std::optional<at::Tensor> bias = biases->get(j);
      if (bias.has_value()) m.bias = bias->data_ptr<float>();
    }
    maps.push_back(std::move(m));
  }
  return maps;
}

}  // namespace

// The forward time loop; fills output, c_last and the saved buffers (each (T, B, .), or one
// block when not keep; cells2 (T + 1, B, H), or two blocks used in turn).
void chain_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                   at::TensorList weights, c10::IntArrayRef factors,
                   const c10::List<std::optional<at::Tensor>>& biases,
                   const at::Tensor& gate_weight, const std::optional<at::Tensor>& gate_bias,
                   const at::Tensor& output, const at::Tensor& c_last, const at::Tensor& xh,
                   at::TensorList states, const c10::List<std::optional<at::Tensor>>& inners,
                   at::TensorList sig, const at::Tensor& act, const at::Tensor& tanh_g2,
                   const at::Tensor& tanh_c, const at::Tensor& cells2, bool keep,
                   int64_t threads, bool split_rows) {
  const int64_t steps = x.size(0), rows = x.size(1), I = x.size(2), H = h0.size(1);
  const int64_t rounds = static_cast<int64_t>(factors.size());
  const States state(x, h0, output, xh, states, rounds, keep);
  const std::vector<RoundMaps> maps = round_maps(weights, factors, &biases, team_size(threads));
  const Panels gates(gate_weight.t(), {H, H, H, H}, team_size(threads));
  const float* gate_b = gate_bias.has_value() ? gate_bias->data_ptr<float>() : nullptr;
  std::vector<Sequence> sig_seq, inner_seq(rounds);
  for (int64_t j = 0; j < rounds; ++j) {
    sig_seq.emplace_back(sig[j], keep);
    const std::optional<at::Tensor> inner = inners.get(j);
    if (inner.has_value()) inner_seq[j] = Sequence(*inner, keep);
  }
  const Sequence act_s(act, keep), g2_s(tanh_g2, keep), tc_s(tanh_c, keep);
  const Sequence cells(cells2);
  int64_t scratch_width = gates.padded_width();
  for (const auto& m : maps)
    for (const auto& p : m.products) scratch_width = std::max(scratch_width, p.padded_width());
  at::Tensor scratch_t = at::empty({rows, scratch_width}, x.options());
  float* const scratch = scratch_t.data_ptr<float>();
  const int64_t hp = gates.panels() / 4;  // panels per gate
  cells2[0].copy_(c0 * 2);
  if (state.h_final == 0) xh[0].narrow(1, I, H).copy_(h0);  // later steps: copied in the loop
  const int64_t last_cell = keep ? steps : steps % 2;

#pragma omp parallel num_threads(team_size(threads))
  {
    const Part part(rows, split_rows);
    const int64_t r0 = part.row_begin, r1 = part.row_end;
    float* const c_rows = scratch + r0 * scratch_width;
    for (int64_t t = 0; t < steps; ++t) {
      // With fewer than two rounds, x or h_{t-1} enter the gate product unchanged: copied in.
      if (state.x_final == -1 || (state.h_final == 0 && t > 0)) {
        const Share share = part.own_rows();
        for (int64_t b = share.begin; b < share.end; ++b) {
          if (state.x_final == -1)
            std::memcpy(state.xh.at(t, b), state.x.at(t, b), I * sizeof(float));
          if (state.h_final == 0 && t > 0)
            std::memcpy(state.xh.at(t, b) + I, state.output.at(t - 1, b), H * sizeof(float));
        }
        part.sync();
      }
      for (int64_t j = 1; j <= rounds; ++j) {
        const RoundMaps& m = maps[j - 1];
        const float* in = state.at(j - 1, t, r0);
        int64_t lda = state.rows(j - 1, t).ld;
        if (m.products.size() == 2)  // low rank: the inner value first
          in = inner_value(part, in, lda, m.products[0], scratch, scratch_width,
                           inner_seq[j - 1], t);
        const Panels& out_map = m.products.back();
        const Share share = part.columns(out_map.panels());
        gemm(in, lda, part.rows(), out_map, share.begin, share.end, c_rows, scratch_width, false);
        const int64_t c1 = std::min(share.end * L, out_map.widths[0]);
        for (int64_t b = r0; b < r1; ++b) {
          const float* gated = state.at(j - 2, t, b);
          float* u = state.at(j, t, b);
          float* s_out = sig_seq[j - 1].at(t, b);
          for (int64_t c = share.begin * L; c < c1; c += L) {
            const int64_t n = std::min(L, c1 - c);
            vec z = load(scratch + b * scratch_width + c);
            if (m.bias) z += load(m.bias + c, n);
            const vec s = sigmoid_v(z);
            store(s_out + c, s, n);
            store(u + c, s * load(gated + c, n), n);
          }
        }
        part.sync();
      }
      // Gates: this thread's hidden units, all four gates of each.
      const Share share = part.columns(hp);
      for (int64_t g = 0; g < 4; ++g)
        gemm(state.xh.at(t, r0), state.xh.row, part.rows(), gates, g * hp + share.begin,
             g * hp + share.end, c_rows, scratch_width, false);
      const int64_t u1 = std::min(share.end * L, H);
      const int64_t cell_in = keep ? t : t % 2, cell_out = keep ? t + 1 : (t + 1) % 2;
      for (int64_t b = r0; b < r1; ++b) {
        const float* pre = scratch + b * scratch_width;
        float* a_out = act_s.at(t, b);
        for (int64_t u = share.begin * L; u < u1; u += L) {
          const int64_t n = std::min(L, u1 - u);
          vec a[4];
          for (int64_t g = 0; g < 4; ++g) {
            vec z = load(pre + g * hp * L + u);
            if (gate_b) z += load(gate_b + g * H + u, n);
            a[g] = sigmoid_v(z);
            store(a_out + g * H + u, a[g], n);
          }
          const vec g2 = a[2] * 4.0f - 2.0f;  // 2 tanh(g)
          const vec cell2 = a[1] * load(cells.at(cell_in, b) + u, n) + a[0] * g2;  // 2 c'
          const vec tc = sigmoid_v(cell2) * 2.0f - 1.0f;  // tanh(c')
          const vec h = a[3] * tc;
          store(g2_s.at(t, b) + u, g2, n);
          store(cells.at(cell_out, b) + u, cell2, n);
          store(tc_s.at(t, b) + u, tc, n);
          store(state.output.at(t, b) + u, h, n);
        }
      }
      part.sync();
    }
  }
  c_last.copy_(cells2[last_cell] / 2);
}

// The backward time loop: the data gradients. Fills grad_x, grad_h0, grad_c0 and, over time,
// grad_act (the gates' pre-activations), grad_z (each round's pre-activation) and grad_inners
// (a low-rank round's inner value), from which fused.py forms the weight gradients.
void chain_backward(const at::Tensor& grad_output, const at::Tensor& grad_h,
                    const at::Tensor& grad_c, const at::Tensor& x, const at::Tensor& h0,
                    const at::Tensor& output, const at::Tensor& xh, at::TensorList states,
                    at::TensorList sig, const at::Tensor& act, const at::Tensor& tanh_g2,
                    const at::Tensor& tanh_c, const at::Tensor& cells2, at::TensorList weights,
                    c10::IntArrayRef factors, const at::Tensor& gate_weight,
                    const at::Tensor& grad_x, const at::Tensor& grad_h0,
                    const at::Tensor& grad_c0, const at::Tensor& grad_act,
                    at::TensorList grad_z,
                    const c10::List<std::optional<at::Tensor>>& grad_inners, int64_t threads,
                    bool split_rows) {
  const int64_t steps = x.size(0), rows = x.size(1), I = x.size(2), H = h0.size(1);
  const int64_t rounds = static_cast<int64_t>(factors.size());
  const States state(x, h0, output, xh, states, rounds, true);
  const std::vector<RoundMaps> maps = round_maps(weights, factors, nullptr, team_size(threads));
  const Panels gates(gate_weight, {I, H}, team_size(threads));
  const int64_t ip = round_up(I);
  // The gradient of each state u_s (s = 0 .. r) within a step, padded to whole panels.
  std::vector<at::Tensor> grad_state_t;
  std::vector<float*> grad_state;
  for (int64_t s = 0; s <= rounds; ++s) {
    grad_state_t.push_back(at::zeros({rows, round_up(state.width(s))}, x.options()));
    grad_state.push_back(grad_state_t.back().data_ptr<float>());
  }
  const Sequence gx(grad_x);
  auto grad_of = [&](int64_t s, int64_t t, int64_t b) -> float* {
    return s == -1 ? gx.at(t, b) : grad_state[s] + b * round_up(state.width(s));
  };
  std::vector<Sequence> sig_seq, dz_seq, dinner_seq(rounds);
  for (int64_t j = 0; j < rounds; ++j) {
    sig_seq.emplace_back(sig[j]);
    dz_seq.emplace_back(grad_z[j]);
    const std::optional<at::Tensor> inner = grad_inners.get(j);
    if (inner.has_value()) dinner_seq[j] = Sequence(*inner);
  }
  const Sequence go(grad_output), act_s(act), g2_s(tanh_g2), tc_s(tanh_c),
      cells(cells2), dact(grad_act);
  at::Tensor dc2_t = grad_c / 2;  // the gradient of the doubled cell, (B, H)
  float* const dc2 = dc2_t.data_ptr<float>();
  const float* const dh_last = grad_h.data_ptr<float>();
  int64_t scratch_width = gates.padded_width();
  for (const auto& m : maps) scratch_width = std::max(scratch_width, m.products[0].padded_width());
  at::Tensor scratch_t = at::empty({rows, scratch_width}, x.options());
  float* const scratch = scratch_t.data_ptr<float>();
  const int64_t hp = round_up(H) / L;
  const int64_t h_width = round_up(H);

#pragma omp parallel num_threads(team_size(threads))
  {
    const Part part(rows, split_rows);
    const int64_t r0 = part.row_begin, r1 = part.row_end;
    float* const c_rows = scratch + r0 * scratch_width;
    const Share units = part.columns(hp);
    const int64_t u1 = std::min(units.end * L, H);
    for (int64_t t = steps - 1; t >= 0; --t) {
      // Through the cell and the gates' sigmoids: this thread's hidden units.
      for (int64_t b = r0; b < r1; ++b) {
        const float* dh_next = t == steps - 1 ? dh_last + b * H : grad_state[0] + b * h_width;
        const float* a_in = act_s.at(t, b);
        float* d_pre = dact.at(t, b);
        for (int64_t u = units.begin * L; u < u1; u += L) {
          const int64_t n = std::min(L, u1 - u);
          const vec dh = load(go.at(t, b) + u, n) + load(dh_next + u, n);
          const vec ai = load(a_in + u, n), af = load(a_in + H + u, n),
                    ag = load(a_in + 2 * H + u, n), ao = load(a_in + 3 * H + u, n);
          const vec tc = load(tc_s.at(t, b) + u, n);
          vec dc = load(dc2 + b * H + u, n) + dh * ao * (1.0f - tc * tc) * 0.5f;
          store(d_pre + u, dc * load(g2_s.at(t, b) + u, n) * ai * (1.0f - ai), n);
          store(d_pre + H + u, dc * load(cells.at(t, b) + u, n) * af * (1.0f - af), n);
          store(d_pre + 2 * H + u, dc * 4.0f * ai * ag * (1.0f - ag), n);
          store(d_pre + 3 * H + u, dh * tc * ao * (1.0f - ao), n);
          store(dc2 + b * H + u, dc * af, n);
        }
      }
      part.sync();
      {  // [dx, dh] of the gate product, into the two final states' gradients
        const Share share = part.columns(gates.panels());
        gemm(dact.at(t, r0), dact.row, part.rows(), gates, share.begin, share.end, c_rows,
             scratch_width, false);
        for (int64_t b = r0; b < r1; ++b)
          for (int64_t c = share.begin * L; c < share.end * L; c += L) {
            const bool x_half = c < ip;
            const int64_t col = x_half ? c : c - ip, width = x_half ? I : H;
            if (col >= width) continue;
            float* dst = grad_of(x_half ? state.x_final : state.h_final, t, b);
            store(dst + col, load(scratch + b * scratch_width + c), std::min(L, width - col));
          }
      }
      part.sync();
      for (int64_t j = rounds; j >= 1; --j) {
        const RoundMaps& m = maps[j - 1];
        const int64_t width = state.width(j);
        {  // dz_j = du_j σ'(z_j) u_{j-2};  du_{j-2} = du_j σ(z_j)
          const Share share = part.columns(round_up(width) / L);
          const int64_t c1 = std::min(share.end * L, width);
          for (int64_t b = r0; b < r1; ++b) {
            const float* du = grad_of(j, t, b);
            const float* s_in = sig_seq[j - 1].at(t, b);
            const float* gated = state.at(j - 2, t, b);
            float* dz = dz_seq[j - 1].at(t, b);
            float* d_gated = grad_of(j - 2, t, b);
            for (int64_t c = share.begin * L; c < c1; c += L) {
              const int64_t n = std::min(L, c1 - c);
              const vec g = load(du + c, n), s = load(s_in + c, n);
              store(dz + c, g * s * (1.0f - s) * load(gated + c, n), n);
              store(d_gated + c, g * s, n);
            }
          }
        }
        part.sync();
        const float* dz = dz_seq[j - 1].at(t, r0);
        int64_t lda = dz_seq[j - 1].row;
        if (m.products.size() == 2)  // low rank: dz A first
          dz = inner_value(part, dz, lda, m.products[0], scratch, scratch_width,
                           dinner_seq[j - 1], t);
        const Panels& last = m.products.back();
        const Share share = part.columns(last.panels());
        const int64_t ldg = round_up(state.width(j - 1));
        gemm(dz, lda, part.rows(), last, share.begin, share.end, grad_state[j - 1] + r0 * ldg,
             ldg, true);
        part.sync();
      }
    }
  }
  grad_h0.copy_(grad_state_t[0].narrow(1, 0, H));
  grad_c0.copy_(dc2_t * 2);
}

// scale · A^T B summed over all R rows: A (R, m), B (R, n), each row contiguous -> (m, n). A
// weight gradient, read in place: each thread owns row tiles of the result and runs over R in
// blocks that keep a block of B's vectors in L1. When n is not a multiple of L, a row's last
// vector reads past its end (into the next row; those columns of C are dropped), so B's last
// row is taken from a zero-padded copy instead, and no read passes the end of B.
at::Tensor rows_product(const at::Tensor& a, const at::Tensor& b, double scale, int64_t threads) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0), "rows_product: shapes ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.stride(1) == 1 && b.stride(1) == 1, "rows_product: rows must be contiguous");
  const int64_t R = a.size(0), m = a.size(1), n = b.size(1), width = round_up(n);
  const int64_t in_place = width == n ? R : R - 1;  // rows of B read where they are
  at::Tensor last_row;
  if (in_place < R) {
    last_row = at::zeros({width}, b.options());
    last_row.narrow(0, 0, n).copy_(b[R - 1]);
  }
  at::Tensor c = at::empty({m, width}, a.options());
  const float* const last = in_place < R ? last_row.data_ptr<float>() : nullptr;
  const float* const a_data = a.data_ptr<float>();
  const float* const b_data = b.data_ptr<float>();
  float* const c_data = c.data_ptr<float>();
  const int64_t lda = a.stride(0), ldb = b.stride(0), block = 256;
#pragma omp parallel num_threads(team_size(threads))
  {
    const Share share((m + 7) / 8, omp_get_thread_num(), omp_get_num_threads());
    const int64_t i0 = share.begin * 8, i1 = std::min(share.end * 8, m);
    for (int64_t k0 = 0; k0 < in_place && i0 < i1; k0 += block) {
      const Operands o{a_data + k0 * lda + i0, 1, lda, b_data + k0 * ldb, ldb, L,
                       std::min(block, in_place - k0)};
      tiles(o, i1 - i0, 0, width / L, c_data + i0 * width, width, k0 > 0);
    }
    if (in_place < R && i0 < i1) {
      const Operands o{a_data + in_place * lda + i0, 1, lda, last, 0, L, 1};
      tiles(o, i1 - i0, 0, width / L, c_data + i0 * width, width, in_place > 0);
    }
  }
  if (scale != 1.0) c.mul_(scale);
  return width == n ? c : c.narrow(1, 0, n);
}

TORCH_LIBRARY(mogrifier_fast, m) {
  m.def(
      "chain_forward(Tensor x, Tensor h0, Tensor c0, Tensor[] weights, int[] factors, "
      "Tensor?[] biases, Tensor gate_weight, Tensor? gate_bias, Tensor(a!) output, "
      "Tensor(b!) c_last, Tensor(c!) xh, Tensor(d!)[] states, Tensor(e!)?[] inners, "
      "Tensor(f!)[] sig, Tensor(g!) act, Tensor(h!) tanh_g2, Tensor(i!) tanh_c, "
      "Tensor(j!) cells2, bool keep, int threads, bool split_rows) -> ()");
  m.def(
      "chain_backward(Tensor grad_output, Tensor grad_h, Tensor grad_c, Tensor x, Tensor h0, "
      "Tensor output, Tensor xh, Tensor[] states, Tensor[] sig, Tensor act, Tensor tanh_g2, "
      "Tensor tanh_c, Tensor cells2, Tensor[] weights, int[] factors, Tensor gate_weight, "
      "Tensor(a!) grad_x, Tensor(b!) grad_h0, Tensor(c!) grad_c0, Tensor(d!) grad_act, "
      "Tensor(e!)[] grad_z, Tensor(f!)?[] grad_inners, int threads, bool split_rows) -> ()");
  m.def("rows_product(Tensor a, Tensor b, float scale, int threads) -> Tensor");
}

TORCH_LIBRARY_IMPL(mogrifier_fast, CPU, m) {
  m.impl("chain_forward", chain_forward);
  m.impl("chain_backward", chain_backward);
  m.impl("rows_product", rows_product);
}
