// The time loops of backend "fused" and its weight-gradient product, templated on a micro-kernel
// description Tile (see the isa_*.cpp files):
//   Tile::VL  floats per vector (and columns per packed panel),
//   Tile::MR  rows of the register tile, Tile::NV its vectors (the tile is MR x NV·VL floats:
//             MR·NV accumulators, NV vectors of B and one broadcast of A live at once).
// Included by each isa_*.cpp file after it sets its instruction set, and only there: the
// anonymous namespace gives every such file its own copy.
//
// The math and the buffers are those of backends/fused.py, whose Python loops fill the same
// saved buffers and gradient buffers. How a step runs here:
//
// * Every product is a Product: column blocks (the four gates, or the x and h halves of
//   [x, h]), each a sum of terms over ranges of the inner dimension, each term a stored
//   parameter times a power of two. A product runs either on panels packed once per call
//   (K x VL contiguous, zero-padded, powers of two folded in exactly) by the register tile, or
//   on the parameters where they are: by the same tile when B's rows are the parameter's rows,
//   by dot products when they are its columns (the forward's u W^T). Packing pays over many
//   steps; a few steps (one token at a time) read the weights as they are, copying nothing.
// * Pointwise work on whole vectors right after the product, on the columns just computed, by
//   the thread that computed them (sigmoid through a polynomial exp, as accurate as expf).
// * One OpenMP team for the whole sequence (see Part): each thread runs the recurrence on its
//   own batch rows, with no barrier, or takes a share of each product's columns, with a
//   barrier between dependent phases.
// Each output element is computed by one thread in a fixed order, whatever the team size.

namespace {

using namespace mogrifier_chain;

inline int team_size(int64_t threads) { return static_cast<int>(std::max<int64_t>(1, threads)); }

// This thread's share [begin, end) of n items split over the team.
struct Share {
  int64_t begin, end;
  Share(int64_t n, int thread, int threads)
      : begin(n * thread / threads), end(n * (thread + 1) / threads) {}
  Share(int64_t begin_, int64_t end_) : begin(begin_), end(end_) {}
};

// A thread's part of the time loops. Split by columns, every thread takes all rows and a share of
// each product's columns, with a barrier between dependent phases. Split by rows (blocks of
// `granule`), each thread runs the whole recurrence on its own rows, which never mix: no
// barrier at all, but every thread reads all the weights each step. A packed batch's rows run
// for different numbers of steps (the first ones longest), so the blocks are shared out by
// the steps their rows run, not by their count.
struct Part {
  int64_t row_begin = 0, row_end = 0;
  int thread = 0, team = 1;

  Part(const Call& c, int64_t granule) {
    const int64_t rows = c.rows;
    const int id = omp_get_thread_num(), size = omp_get_num_threads();
    if (c.plan.split_rows) {
      const int64_t blocks = (rows + granule - 1) / granule;
      // done[i]: the row-steps of blocks [0, i); each thread's share of them ends at the block
      // boundary nearest to its even share's end.
      std::vector<int64_t> done(blocks + 1, 0);
      for (int64_t i = 0; i < blocks; ++i) {
        done[i + 1] = done[i];
        for (int64_t b = i * granule; b < std::min(rows, (i + 1) * granule); ++b)
          done[i + 1] += c.length(b);
      }
      const Share work(done[blocks], id, size);
      const auto first_block = [&](int64_t w) {
        const int64_t i = std::lower_bound(done.begin(), done.end(), w) - done.begin();
        return i > 0 && (i > blocks || w - done[i - 1] < done[i] - w) ? i - 1 : i;
      };
      row_begin = std::min(first_block(work.begin) * granule, rows);
      row_end = std::min(first_block(work.end) * granule, rows);
      if (id == size - 1) row_end = rows;
    } else {
      row_end = rows;
      thread = id;
      team = size;
    }
  }
  // This part's rows among the first n (the rows a step of a packed batch runs): [row_begin,
  // end(n)), rows(n) of them.
  int64_t end(int64_t n) const { return std::max(row_begin, std::min(row_end, n)); }
  int64_t rows(int64_t n) const { return end(n) - row_begin; }
  Share columns(int64_t n) const { return Share(n, thread, team); }
  Share own_rows(int64_t n) const {
    const Share share(rows(n), thread, team);
    return {row_begin + share.begin, row_begin + share.end};
  }
  void sync() const {
    if (team > 1) {
#pragma omp barrier
    }
  }
};

// The vector types of N lanes (GCC's vector extensions: plain arithmetic compiles to the target's
// vector instructions).
template <int N>
struct Vectors {
  typedef float vec __attribute__((vector_size(N * sizeof(float))));
  typedef int32_t ivec __attribute__((vector_size(N * sizeof(int32_t))));
};

template <class Tile>
struct Loops {
  static constexpr int64_t L = Tile::VL;
  using vec = typename Vectors<Tile::VL>::vec;
  using ivec = typename Vectors<Tile::VL>::ivec;

  static int64_t round_up(int64_t n) { return (n + L - 1) / L * L; }

  // ---- vectors ------------------------------------------------------------------------------

  template <size_t... I>
  static vec splat_lanes(float a, std::index_sequence<I...>) {
    return vec{((void)I, a)...};
  }
  // Every lane a (no +0.0 added: exact for a = -0.0, and a plain broadcast).
  static vec splat(float a) { return splat_lanes(a, std::make_index_sequence<Tile::VL>()); }
  // n < L: the first n lanes (the rest zero on load, untouched on store), read by the tile's
  // masked load where it has one (Tile::load_partial), else through memory.
  static vec load(const float* p, int64_t n = L) {
    vec v = {};
    if (n == L) {
      std::memcpy(&v, p, sizeof v);
    } else if constexpr (requires { Tile::load_partial(p, n); }) {
      v = (vec)Tile::load_partial(p, n);
    } else {
      std::memcpy(&v, p, n * sizeof(float));
    }
    return v;
  }
  static void store(float* p, vec v, int64_t n = L) {
    if (n == L)
      std::memcpy(p, &v, sizeof v);
    else
      std::memcpy(p, &v, n * sizeof(float));
  }
  // The lanes' sum, in lane order.
  static float sum_lanes(vec v) {
    float s = v[0];
    for (int i = 1; i < Tile::VL; ++i) s += v[i];
    return s;
  }
  // exp by range reduction to [-ln2/2, ln2/2] and a degree-6 polynomial (about 1 ulp); inputs
  // clamped to where 2^n stays a normal float; NaN passes through.
  static vec exp_v(vec x) {
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
  static vec sigmoid_v(vec x) { return 1.0f / (1.0f + exp_v(-x)); }
  // tanh to float32's relative accuracy, given far = 2σ(2x) − 1 (which callers often have): an
  // odd polynomial near zero (the minimax fit of the classic single-precision tanh for
  // |x| < 0.625), `far` beyond, where that identity's absolute error (about 1e-7) is also
  // relative (|tanh x| > 0.55).
  static vec tanh_v(vec x, vec far) {
    const vec z = x * x;
    const vec poly = (((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z +
                      1.33314422036e-1f) * z - 3.33332819422e-1f;
    return z < 0.390625f ? x + x * z * poly : far;  // |x| < 0.625
  }

  // ---- the register tile --------------------------------------------------------------------

  // C[0:MR, vectors 0..NV) = (C +) scale · sum over k < K of A(i, k) B(k, .), with
  // A(i, k) = a[i a_row + k a_k] and row k of B's vector v at b + k b_k + v b_v; rows of C
  // ldc apart, written as whole vectors. With PARTIAL, B's last vector has only `last` columns
  // (read no further; the rest taken as zero).
  struct Operands {
    const float* a;
    int64_t a_row, a_k;
    const float* b;
    int64_t b_k, b_v, K;
  };
  struct Out {
    float* c;
    int64_t ldc;
    bool accumulate;
    float scale;
  };

  template <int MR, int NV, bool PARTIAL>
  static void tile(const Operands& o, const Out& out, int64_t last) {
    vec acc[MR][NV];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = vec{};
    const float* a = o.a;
    const float* b = o.b;
    for (int64_t k = 0; k < o.K; ++k, a += o.a_k, b += o.b_k) {
      vec bk[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        bk[v] = PARTIAL && v == NV - 1 ? load(b + v * o.b_v, last) : load(b + v * o.b_v);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const vec ai = splat(a[i * o.a_row]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] += ai * bk[v];
      }
    }
    const vec scale = splat(out.scale);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        float* c = out.c + i * out.ldc + v * L;
        store(c, out.accumulate ? load(c) + acc[i][v] * scale : acc[i][v] * scale);
      }
  }

  // Rows [0, rows) of C, NV vectors wide, in tiles of up to MR rows.
  template <int NV, bool PARTIAL>
  static void row_tiles(Operands o, int64_t rows, Out out, int64_t last) {
    int64_t i = 0;
    for (; i + Tile::MR <= rows; i += Tile::MR) {
      tile<Tile::MR, NV, PARTIAL>(o, out, last);
      o.a += Tile::MR * o.a_row;
      out.c += Tile::MR * out.ldc;
    }
    row_tail<NV, PARTIAL, Tile::MR - 1>(o, rows - i, out, last);
  }
  template <int NV, bool PARTIAL, int M>
  static void row_tail(const Operands& o, int64_t rows, const Out& out, int64_t last) {
    if constexpr (M > 0) {
      if (rows == M) return tile<M, NV, PARTIAL>(o, out, last);
      row_tail<NV, PARTIAL, M - 1>(o, rows, out, last);
    }
  }
  // A group of NV vectors (NV <= Tile::NV).
  template <int NV>
  static void group(const Operands& o, int64_t rows, const Out& out, int64_t nv, int64_t last) {
    if constexpr (NV > 0) {
      if (nv != NV) return group<NV - 1>(o, rows, out, nv, last);
      if (last < L)
        row_tiles<NV, true>(o, rows, out, last);
      else
        row_tiles<NV, false>(o, rows, out, last);
    }
  }
  // Vectors [v0, v1) of C's rows [0, rows), with o.b and out.c at vector 0; the vector v1 - 1
  // has `last` columns.
  static void tiles(Operands o, int64_t rows, int64_t v0, int64_t v1, Out out, int64_t last) {
    const float* b = o.b;
    float* c = out.c;
    for (int64_t v = v0; v < v1; v += Tile::NV) {
      const int64_t nv = std::min<int64_t>(Tile::NV, v1 - v);
      o.b = b + v * o.b_v;
      out.c = c + v * L;
      group<Tile::NV>(o, rows, out, nv, v + nv == v1 ? last : L);
    }
  }

  // C[b][o] = (C +) scale · sum over k < K of W[o][k] u[b][k], for MO outputs and MB rows: the
  // product by a parameter's columns, as dot products (accumulated per lane, then summed).
  template <int MO, int MB>
  static void dot_tile(const float* w, int64_t ldw, const float* u, int64_t ldu, int64_t K_,
                       const Out& out) {
    vec acc[MO][MB];
    for (int o = 0; o < MO; ++o)
      for (int b = 0; b < MB; ++b) acc[o][b] = vec{};
    int64_t k = 0;
    for (; k + L <= K_; k += L) {
      vec wv[MO], uv[MB];
      for (int o = 0; o < MO; ++o) wv[o] = load(w + o * ldw + k);
      for (int b = 0; b < MB; ++b) uv[b] = load(u + b * ldu + k);
      for (int o = 0; o < MO; ++o)
        for (int b = 0; b < MB; ++b) acc[o][b] += wv[o] * uv[b];
    }
    if (k < K_) {  // the last, partial vector
      vec wv[MO], uv[MB];
      for (int o = 0; o < MO; ++o) wv[o] = load(w + o * ldw + k, K_ - k);
      for (int b = 0; b < MB; ++b) uv[b] = load(u + b * ldu + k, K_ - k);
      for (int o = 0; o < MO; ++o)
        for (int b = 0; b < MB; ++b) acc[o][b] += wv[o] * uv[b];
    }
    for (int o = 0; o < MO; ++o)
      for (int b = 0; b < MB; ++b) {
        float* c = out.c + b * out.ldc + o;
        const float s = sum_lanes(acc[o][b]) * out.scale;
        *c = out.accumulate ? *c + s : s;
      }
  }
  static constexpr int DOT_OUTPUTS = 4, DOT_ROWS = 2;
  // Outputs [o0, o1) for rows [0, rows): W's rows o at w + o ldw, u's rows ldu apart.
  static void dots(const float* w, int64_t ldw, const float* u, int64_t ldu, int64_t rows,
                   int64_t K_, int64_t o0, int64_t o1, Out out) {
    for (int64_t b = 0; b < rows; b += DOT_ROWS) {
      Out row_out = out;
      row_out.c = out.c + b * out.ldc;
      const float* ub = u + b * ldu;
      const bool pair = b + DOT_ROWS <= rows;
      int64_t o = o0;
      for (; o + DOT_OUTPUTS <= o1; o += DOT_OUTPUTS) {
        Out o_out = row_out;
        o_out.c += o;
        if (pair)
          dot_tile<DOT_OUTPUTS, DOT_ROWS>(w + o * ldw, ldw, ub, ldu, K_, o_out);
        else
          dot_tile<DOT_OUTPUTS, 1>(w + o * ldw, ldw, ub, ldu, K_, o_out);
      }
      for (; o < o1; ++o) {
        Out o_out = row_out;
        o_out.c += o;
        if (pair)
          dot_tile<1, DOT_ROWS>(w + o * ldw, ldw, ub, ldu, K_, o_out);
        else
          dot_tile<1, 1>(w + o * ldw, ldw, ub, ldu, K_, o_out);
      }
    }
  }

  // ---- products -----------------------------------------------------------------------------

  // B(k, n) for k in [k0, k1) of a column block: scale · data[n ld + k - k0] (by_column: the
  // parameter's rows are B's columns) or scale · data[(k - k0) ld + n] (its rows are B's rows).
  struct Term {
    int64_t k0, k1;
    const float* data;
    int64_t ld;
    float scale;
    bool by_column;
  };
  struct Block {
    int64_t width, first_panel;
    std::vector<Term> terms;  // cover [0, K) once between them
  };

  // C (rows, padded width) (+)= A (rows, K) B for B in column blocks, each starting a panel
  // of L columns, either packed (panels (K, L) contiguous, one per L columns of every block) or
  // read from the terms where they are.
  struct Product {
    int64_t K = 0, panel_count = 0;
    std::vector<Block> blocks;
    std::unique_ptr<float[]> packed;  // null: not packed

    void add_block(int64_t width, std::vector<Term> terms) {
      blocks.push_back({width, panel_count, std::move(terms)});
      panel_count += round_up(width) / L;
    }
    int64_t panels() const { return panel_count; }
    int64_t padded_width() const { return panel_count * L; }

    // Each panel written once: a block's last panel zero past the block's width. A parameter
    // read by columns is transposed in blocks of K_BLOCK of its columns, which stay in L1.
    void pack(int threads) {
      static constexpr int64_t K_BLOCK = 64;
      packed.reset(new float[panel_count * K * L]);
      for (const Block& block : blocks) {
        const int64_t block_panels = round_up(block.width) / L;
#pragma omp parallel for num_threads(threads) if (K * block.width >= (1 << 16))
        for (int64_t q = 0; q < block_panels; ++q) {
          float* panel = packed.get() + (block.first_panel + q) * K * L;
          const int64_t n0 = q * L, n1 = std::min(block.width, n0 + L);
          for (const Term& t : block.terms) {
            if (t.by_column) {
              for (int64_t k0 = t.k0; k0 < t.k1; k0 += K_BLOCK)
                for (int64_t n = n0; n < n1; ++n) {
                  const float* column = t.data + n * t.ld - t.k0;
                  for (int64_t k = k0; k < std::min(t.k1, k0 + K_BLOCK); ++k)
                    panel[k * L + n - n0] = t.scale * column[k];
                }
            } else {
              for (int64_t k = t.k0; k < t.k1; ++k)
                for (int64_t n = n0; n < n1; ++n)
                  panel[k * L + n - n0] = t.scale * t.data[(k - t.k0) * t.ld + n];
            }
          }
          if (n1 - n0 < L)
            for (int64_t k = 0; k < K; ++k)
              std::fill(panel + k * L + n1 - n0, panel + (k + 1) * L, 0.0f);
        }
      }
    }

    // Columns [p0 L, p1 L) of C (rows, ldc apart) (+)= A (rows, K; rows lda apart) B.
    void run(const float* a, int64_t lda, int64_t rows, int64_t p0, int64_t p1, float* c,
             int64_t ldc, bool accumulate) const {
      if (rows <= 0 || p0 >= p1) return;
      if (packed) {
        const Operands o{a, lda, 1, packed.get(), L, K * L, K};
        return tiles(o, rows, p0, p1, {c, ldc, accumulate, 1.0f}, L);
      }
      for (const Block& block : blocks) {
        const int64_t q0 = std::max(p0, block.first_panel) - block.first_panel;
        const int64_t q1 = std::min(p1, block.first_panel + round_up(block.width) / L) -
                           block.first_panel;
        if (q0 >= q1) continue;
        float* block_c = c + block.first_panel * L;
        const int64_t n1 = std::min(q1 * L, block.width);
        bool add = accumulate;
        for (const Term& t : block.terms) {
          const Out out{block_c, ldc, add, t.scale};
          if (t.by_column) {
            dots(t.data, t.ld, a + t.k0, lda, rows, t.k1 - t.k0, q0 * L, n1, out);
          } else {
            const Operands o{a + t.k0, lda, 1, t.data, t.ld, L, t.k1 - t.k0};
            tiles(o, rows, q0, q1, out, n1 - (q1 - 1) * L);
          }
          add = true;
        }
      }
    }
  };

  // ---- the layer's products -----------------------------------------------------------------

  // The four gates' pre-activations from [x, h] (K = I + P), one block per gate; the g gate's
  // doubled (tanh(g) = 2σ(2g) − 1).
  static Product gates_forward(const Params& p) {
    const int64_t I = p.input_size, H = p.hidden_size, P = p.state_size;
    Product product;
    product.K = I + P;
    for (int64_t g = 0; g < 4; ++g) {
      const float gate = g == 2 ? 2.0f : 1.0f;
      const Matrix &x = p.w_ih, &h = p.w_hh;
      product.add_block(H, {{0, I, x.data + g * H * x.ld, x.ld, gate * p.scale_x, true},
                            {I, I + P, h.data + g * H * h.ld, h.ld, gate * p.scale_h, true}});
    }
    return product;
  }
  // Its backward: the gates' pre-activation gradients (K = 4H) -> [dx, dh], two blocks.
  static Product gates_backward(const Params& p) {
    const int64_t I = p.input_size, H = p.hidden_size;
    Product product;
    product.K = 4 * H;
    for (int half = 0; half < 2; ++half) {
      const Matrix& w = half == 0 ? p.w_ih : p.w_hh;
      const float scale = half == 0 ? p.scale_x : p.scale_h;
      std::vector<Term> terms;
      for (int64_t g = 0; g < 4; ++g)
        terms.push_back({g * H, (g + 1) * H, w.data + g * H * w.ld, w.ld,
                         (g == 2 ? 2.0f : 1.0f) * scale, false});
      product.add_block(half == 0 ? I : p.state_size, std::move(terms));
    }
    return product;
  }
  // A parameter f (out, in) as a product: forward v -> scale · v f^T, backward d -> scale · d f.
  static Product matrix_product(const Matrix& f, float scale, bool backward) {
    Product product;
    product.K = backward ? f.rows : f.cols;
    product.add_block(backward ? f.cols : f.rows,
                      {{0, product.K, f.data, f.ld, scale, !backward}});
    return product;
  }
  // Round j's products, in the order they run: forward u -> u (cW)^T, or u (cB)^T then · A^T;
  // backward dz -> dz (cW), or dz A then · (cB).
  static std::vector<Product> round_products(const RoundMap& m, bool backward) {
    std::vector<Product> products;
    auto add = [&](const Matrix& f, float scale) {
      products.push_back(matrix_product(f, scale, backward));
    };
    if (m.factors == 1) {
      add(m.factor[0], m.scale);
    } else if (backward) {
      add(m.factor[0], 1.0f);
      add(m.factor[1], m.scale);
    } else {
      add(m.factor[1], m.scale);
      add(m.factor[0], 1.0f);
    }
    return products;
  }
  // One call's products, forward or backward: each round's, then the gates', packed when the
  // plan says so; and the width of scratch rows that holds any one of their results.
  struct LayerProducts {
    std::vector<std::vector<Product>> rounds;
    Product gates;
    std::unique_ptr<Product> projection;  // h' = v w_hr^T (backward dh w_hr); null without
    int64_t scratch_width;

    LayerProducts(const Call& c, bool backward)
        : gates(backward ? gates_backward(*c.params) : gates_forward(*c.params)) {
      const Params& p = *c.params;
      const Plan& plan = c.plan;
      for (int64_t j = 0; j < p.rounds; ++j) rounds.push_back(round_products(p.maps[j], backward));
      if (p.w_hr.data != nullptr)
        projection = std::make_unique<Product>(matrix_product(p.w_hr, 1.0f, backward));
      scratch_width = gates.padded_width();
      if (projection) scratch_width = std::max(scratch_width, projection->padded_width());
      for (auto& m : rounds)
        for (auto& product : m) scratch_width = std::max(scratch_width, product.padded_width());
      if (!plan.packed) return;
      gates.pack(team_size(plan.threads));
      if (projection) projection->pack(team_size(plan.threads));
      for (auto& m : rounds)
        for (auto& product : m) product.pack(team_size(plan.threads));
    }
  };

  // ---- the states -----------------------------------------------------------------------------

  // The states u_s, s = -1 (the input) .. r, of every step, where fused.py keeps them.
  struct States {
    int64_t rounds, input_size, state_size, x_final, h_final;
    Seq x, output, xh, h0, h_in;
    const Seq* kept;

    explicit States(const Call& c)
        : rounds(c.params->rounds), input_size(c.params->input_size),
          state_size(c.params->state_size), x(c.x), output(c.output), xh(c.saved.xh),
          h0{const_cast<float*>(c.h0), 0, c.params->state_size}, h_in(c.saved.h_in),
          kept(c.saved.states) {
      x_final = rounds % 2 ? rounds : rounds - 1;
      h_final = rounds % 2 ? rounds - 1 : rounds;
    }
    int64_t width(int64_t s) const { return s % 2 ? input_size : state_size; }
    // State s at step t: its first row, and the distance between its rows.
    struct Rows {
      float* first;
      int64_t ld;
    };
    Rows rows(int64_t s, int64_t t) const {
      if (s == -1) return {x.at(t, 0), x.row};
      if (s == 0 && h_in.base != nullptr) return {h_in.at(t, 0), h_in.row};
      if (s == 0) return t == 0 ? Rows{h0.at(0, 0), h0.row} : Rows{output.at(t - 1, 0), output.row};
      if (s == x_final) return {xh.at(t, 0), xh.row};
      if (s == h_final) return {xh.at(t, 0) + input_size, xh.row};
      return {kept[s - 1].at(t, 0), kept[s - 1].row};
    }
    float* at(int64_t s, int64_t t, int64_t b) const {
      const Rows r = rows(s, t);
      return r.first + b * r.ld;
    }
  };

  // A low-rank map's first product of this thread's rows among the first n, in (rows, lda
  // apart) -> (rows, k): this thread's columns of it stored at step t of `inner`, then a
  // barrier. Returns the whole value's rows (and their distance in lda): the input of the map's
  // second product.
  static const float* inner_value(const Part& part, int64_t n, const float* in, int64_t& lda,
                                  const Product& map, float* scratch, int64_t scratch_width,
                                  const Seq& inner, int64_t t) {
    const Share share = part.columns(map.panels());
    map.run(in, lda, part.rows(n), share.begin, share.end,
            scratch + part.row_begin * scratch_width, scratch_width, false);
    const int64_t c1 = std::min(share.end * L, map.blocks[0].width);
    for (int64_t b = part.row_begin; b < part.end(n); ++b)
      for (int64_t c = share.begin * L; c < c1; c += L)
        store(inner.at(t, b) + c, load(scratch + b * scratch_width + c), std::min(L, c1 - c));
    part.sync();
    lda = inner.row;
    return inner.at(t, part.row_begin);
  }

  // ---- the forward --------------------------------------------------------------------------

  static void forward(const ForwardArgs& f) {
    const Call& c = f.call;
    const Params& p = *c.params;
    const int64_t steps = c.steps, rows = c.rows, I = p.input_size, H = p.hidden_size;
    const int64_t P = p.state_size, rounds = p.rounds;
    const int threads = team_size(c.plan.threads);
    const States state(c);
    const LayerProducts products(c, false);
    const Product* projection = products.projection.get();
    const auto& maps = products.rounds;
    const Product& gates = products.gates;
    // The gates' bias, folded: b_ih + b_hh, the g gate's doubled.
    std::vector<float> gate_bias;
    if (p.b_ih != nullptr) {
      gate_bias.resize(4 * H);
      for (int64_t n = 0; n < 4 * H; ++n)
        gate_bias[n] = (p.b_ih[n] + p.b_hh[n]) * (n / H == 2 ? 2.0f : 1.0f);
    }
    const float* gate_b = gate_bias.empty() ? nullptr : gate_bias.data();
    const int64_t scratch_width = products.scratch_width;
    std::vector<float> scratch_buffer(rows * scratch_width);
    float* const scratch = scratch_buffer.data();
    const int64_t hp = gates.panels() / 4;  // panels per gate
    const Seq &act_s = c.saved.act, &g2_s = c.saved.tanh_g2, &tc_s = c.saved.tanh_c;
    const Seq cells = c.saved.cells2;
    for (int64_t b = 0; b < rows; ++b)
      for (int64_t u = 0; u < H; ++u) cells.at(0, b)[u] = 2.0f * f.c0[b * H + u];
    const float* const mask = c.state_mask;
    if (state.h_final == 0 && mask == nullptr)  // later steps: copied in the loop
      for (int64_t b = 0; b < rows; ++b)
        std::memcpy(state.xh.at(0, b) + I, c.h0 + b * P, P * sizeof(float));

#pragma omp parallel num_threads(threads)
    {
      const Part part(c, Tile::MR);
      const int64_t r0 = part.row_begin;
      float* const c_rows = scratch + r0 * scratch_width;
      for (int64_t t = 0; t < steps; ++t) {
        const int64_t active = c.active(t), r1 = part.end(active), own = part.rows(active);
        // With fewer than two rounds, x or h_{t-1} enter the gate product unchanged: copied in.
        // With a state mask, the step reads mask ⊙ h_{t-1}, written into h_in first.
        if (state.x_final == -1 || (state.h_final == 0 && t > 0) || mask != nullptr) {
          const Share share = part.own_rows(active);
          for (int64_t b = share.begin; b < share.end; ++b) {
            if (state.x_final == -1)
              std::memcpy(state.xh.at(t, b), state.x.at(t, b), I * sizeof(float));
            const float* h_prev = t == 0 ? c.h0 + b * P : state.output.at(t - 1, b);
            if (mask != nullptr) {
              float* h_in = state.h_in.at(t, b);
              for (int64_t u = 0; u < P; ++u) h_in[u] = mask[b * P + u] * h_prev[u];
              h_prev = h_in;
            }
            if (state.h_final == 0 && (t > 0 || mask != nullptr))
              std::memcpy(state.xh.at(t, b) + I, h_prev, P * sizeof(float));
          }
          part.sync();
        }
        for (int64_t j = 1; j <= rounds; ++j) {
          const std::vector<Product>& m = maps[j - 1];
          const float* in = state.at(j - 1, t, r0);
          int64_t lda = state.rows(j - 1, t).ld;
          if (m.size() == 2)  // low rank: the inner value first
            in = inner_value(part, active, in, lda, m[0], scratch, scratch_width,
                             c.saved.inners[j - 1], t);
          const Product& out_map = m.back();
          const float* bias = p.maps[j - 1].bias;
          const Share share = part.columns(out_map.panels());
          out_map.run(in, lda, own, share.begin, share.end, c_rows, scratch_width, false);
          const int64_t c1 = std::min(share.end * L, out_map.blocks[0].width);
          for (int64_t b = r0; b < r1; ++b) {
            const float* gated = state.at(j - 2, t, b);
            float* u = state.at(j, t, b);
            float* s_out = c.saved.sig[j - 1].at(t, b);
            for (int64_t c = share.begin * L; c < c1; c += L) {
              const int64_t n = std::min(L, c1 - c);
              vec z = load(scratch + b * scratch_width + c);
              if (bias) z += load(bias + c, n);
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
          gates.run(state.xh.at(t, r0), state.xh.row, own, g * hp + share.begin,
                    g * hp + share.end, c_rows, scratch_width, false);
        const int64_t u1 = std::min(share.end * L, H);
        const int64_t cell_in = f.keep ? t : t % 2, cell_out = f.keep ? t + 1 : (t + 1) % 2;
        for (int64_t b = r0; b < r1; ++b) {
          const float* pre = scratch + b * scratch_width;
          float* a_out = act_s.at(t, b);
          float* h_out = projection ? c.saved.unprojected.at(t, b) : state.output.at(t, b);
          for (int64_t u = share.begin * L; u < u1; u += L) {
            const int64_t n = std::min(L, u1 - u);
            vec a[4], z_g;
            for (int64_t g = 0; g < 4; ++g) {
              vec z = load(pre + g * hp * L + u);
              if (gate_b) z += load(gate_b + g * H + u, n);
              if (g == 2) z_g = z;  // 2g: the g rows are doubled
              a[g] = sigmoid_v(z);
              store(a_out + g * H + u, a[g], n);
            }
            // tanh itself, not 2σ(2v) − 1 from the sigmoids: that identity is exact only in
            // absolute terms, and small outputs (a projection's, say) need relative accuracy.
            const vec g2 = tanh_v(z_g * 0.5f, a[2] * 2.0f - 1.0f) * 2.0f;  // 2 tanh(g)
            const vec cell2 = a[1] * load(cells.at(cell_in, b) + u, n) + a[0] * g2;  // 2 c'
            const vec tc = tanh_v(cell2 * 0.5f, sigmoid_v(cell2) * 2.0f - 1.0f);  // tanh(c')
            const vec h = a[3] * tc;
            store(g2_s.at(t, b) + u, g2, n);
            store(cells.at(cell_out, b) + u, cell2, n);
            store(tc_s.at(t, b) + u, tc, n);
            store(h_out + u, h, n);
          }
        }
        part.sync();
        if (projection) {  // h = (σ(o) tanh(c)) w_hr^T: this thread's columns of it
          const Share columns = part.columns(projection->panels());
          projection->run(c.saved.unprojected.at(t, r0), c.saved.unprojected.row, own,
                          columns.begin, columns.end, c_rows, scratch_width, false);
          const int64_t c1 = std::min(columns.end * L, P);
          for (int64_t b = r0; b < r1; ++b)
            for (int64_t col = columns.begin * L; col < c1; col += L)
              store(state.output.at(t, b) + col, load(scratch + b * scratch_width + col),
                    std::min(L, c1 - col));
          part.sync();
        }
      }
    }
    for (int64_t b = 0; b < rows; ++b) {  // the cell each sequence's last step wrote
      const int64_t length = c.length(b), last_cell = f.keep ? length : length % 2;
      for (int64_t u = 0; u < H; ++u) f.c_last[b * H + u] = cells.at(last_cell, b)[u] / 2.0f;
    }
  }

  // ---- the backward -------------------------------------------------------------------------

  // The data gradients: grad_x, grad_h0, grad_c0 and, over time, grad_act (the gates'
  // pre-activations), grad_z (each round's pre-activation) and grad_inners (a low-rank round's
  // inner value), from which fused.py forms the weight gradients.
  static void backward(const BackwardArgs& g) {
    const Call& c = g.call;
    const Params& p = *c.params;
    const int64_t steps = c.steps, rows = c.rows, I = p.input_size, H = p.hidden_size;
    const int64_t P = p.state_size, rounds = p.rounds;
    const int threads = team_size(c.plan.threads);
    const States state(c);
    const LayerProducts products(c, true);
    const Product* projection = products.projection.get();
    const auto& maps = products.rounds;
    const Product& gates = products.gates;
    const int64_t ip = round_up(I);
    // The gradient of each state u_s (s = 0 .. r) within a step, padded to whole vectors.
    std::vector<std::vector<float>> grad_state_buffers;
    std::vector<float*> grad_state;
    for (int64_t s = 0; s <= rounds; ++s) {
      grad_state_buffers.emplace_back(rows * round_up(state.width(s)), 0.0f);
      grad_state.push_back(grad_state_buffers.back().data());
    }
    auto grad_of = [&](int64_t s, int64_t t, int64_t b) -> float* {
      return s == -1 ? g.grad_x.at(t, b) : grad_state[s] + b * round_up(state.width(s));
    };
    const Seq &go = g.grad_output, &act_s = c.saved.act, &g2_s = c.saved.tanh_g2,
              &tc_s = c.saved.tanh_c, &cells = c.saved.cells2, &dact = g.grad_act;
    std::vector<float> dc2(rows * H);  // the gradient of the doubled cell
    for (int64_t i = 0; i < rows * H; ++i) dc2[i] = g.grad_c[i] / 2.0f;
    const int64_t scratch_width = products.scratch_width;
    std::vector<float> scratch_buffer(rows * scratch_width);
    float* const scratch = scratch_buffer.data();
    const int64_t hp = round_up(H) / L;
    const int64_t h_width = round_up(P);

#pragma omp parallel num_threads(threads)
    {
      const Part part(c, Tile::MR);
      const int64_t r0 = part.row_begin;
      float* const c_rows = scratch + r0 * scratch_width;
      const Share units = part.columns(hp);
      const int64_t u1 = std::min(units.end * L, H);
      for (int64_t t = steps - 1; t >= 0; --t) {
        const int64_t active = c.active(t), r1 = part.end(active), own = part.rows(active);
        // Rows below next_active run step t + 1 too; the others end at step t, their dh is h_n's.
        const int64_t next_active = t + 1 < steps ? c.active(t + 1) : 0;
        auto dh_next = [&](int64_t b) -> const float* {
          return b >= next_active ? g.grad_h + b * P : grad_state[0] + b * h_width;
        };
        if (projection) {  // dh of the projected h (kept for w_hr's gradient), then dh w_hr
          const Share columns = part.columns(h_width / L);
          const int64_t c1 = std::min(columns.end * L, P);
          for (int64_t b = r0; b < r1; ++b)
            for (int64_t col = columns.begin * L; col < c1; col += L) {
              const int64_t n = std::min(L, c1 - col);
              store(g.grad_projected.at(t, b) + col,
                    load(go.at(t, b) + col, n) + load(dh_next(b) + col, n), n);
            }
          part.sync();
          const Share panels = part.columns(projection->panels());
          projection->run(g.grad_projected.at(t, r0), g.grad_projected.row, own, panels.begin,
                          panels.end, c_rows, scratch_width, false);
          part.sync();
        }
        // Through the cell and the gates' sigmoids: this thread's hidden units.
        for (int64_t b = r0; b < r1; ++b) {
          const float* dh_in = dh_next(b);
          const float* dh_projected = scratch + b * scratch_width;
          const float* a_in = act_s.at(t, b);
          float* d_pre = dact.at(t, b);
          float* dc2_b = dc2.data() + b * H;
          for (int64_t u = units.begin * L; u < u1; u += L) {
            const int64_t n = std::min(L, u1 - u);
            const vec dh = projection ? load(dh_projected + u, n)
                                      : load(go.at(t, b) + u, n) + load(dh_in + u, n);
            const vec ai = load(a_in + u, n), af = load(a_in + H + u, n),
                      ag = load(a_in + 2 * H + u, n), ao = load(a_in + 3 * H + u, n);
            const vec tc = load(tc_s.at(t, b) + u, n);
            const vec dc = load(dc2_b + u, n) + dh * ao * (1.0f - tc * tc) * 0.5f;
            store(d_pre + u, dc * load(g2_s.at(t, b) + u, n) * ai * (1.0f - ai), n);
            store(d_pre + H + u, dc * load(cells.at(t, b) + u, n) * af * (1.0f - af), n);
            store(d_pre + 2 * H + u, dc * 4.0f * ai * ag * (1.0f - ag), n);
            store(d_pre + 3 * H + u, dh * tc * ao * (1.0f - ao), n);
            store(dc2_b + u, dc * af, n);
          }
        }
        part.sync();
        {  // [dx, dh] of the gate product, into the two final states' gradients
          const Share share = part.columns(gates.panels());
          gates.run(dact.at(t, r0), dact.row, own, share.begin, share.end, c_rows,
                    scratch_width, false);
          for (int64_t b = r0; b < r1; ++b)
            for (int64_t c = share.begin * L; c < share.end * L; c += L) {
              const bool x_half = c < ip;
              const int64_t col = x_half ? c : c - ip, width = x_half ? I : P;
              if (col >= width) continue;
              float* dst = grad_of(x_half ? state.x_final : state.h_final, t, b);
              store(dst + col, load(scratch + b * scratch_width + c), std::min(L, width - col));
            }
        }
        part.sync();
        for (int64_t j = rounds; j >= 1; --j) {
          const std::vector<Product>& m = maps[j - 1];
          const int64_t width = state.width(j);
          {  // dz_j = du_j σ'(z_j) u_{j-2};  du_{j-2} = du_j σ(z_j)
            const Share share = part.columns(round_up(width) / L);
            const int64_t c1 = std::min(share.end * L, width);
            for (int64_t b = r0; b < r1; ++b) {
              const float* du = grad_of(j, t, b);
              const float* s_in = c.saved.sig[j - 1].at(t, b);
              const float* gated = state.at(j - 2, t, b);
              float* dz = g.grad_z[j - 1].at(t, b);
              float* d_gated = grad_of(j - 2, t, b);
              for (int64_t c = share.begin * L; c < c1; c += L) {
                const int64_t n = std::min(L, c1 - c);
                const vec gv = load(du + c, n), s = load(s_in + c, n);
                store(dz + c, gv * s * (1.0f - s) * load(gated + c, n), n);
                store(d_gated + c, gv * s, n);
              }
            }
          }
          part.sync();
          const float* dz = g.grad_z[j - 1].at(t, r0);
          int64_t lda = g.grad_z[j - 1].row;
          if (m.size() == 2)  // low rank: dz A first
            dz = inner_value(part, active, dz, lda, m[0], scratch, scratch_width,
                             g.grad_inners[j - 1], t);
          const Product& last = m.back();
          const Share share = part.columns(last.panels());
          const int64_t ldg = round_up(state.width(j - 1));
          last.run(dz, lda, own, share.begin, share.end, grad_state[j - 1] + r0 * ldg,
                   ldg, true);
          part.sync();
        }
        if (c.state_mask != nullptr) {  // the step read mask ⊙ h_{t-1}: dh_{t-1} = mask ⊙ du_0
          const Share share = part.own_rows(active);
          for (int64_t b = share.begin; b < share.end; ++b)
            for (int64_t u = 0; u < P; ++u)
              grad_state[0][b * h_width + u] *= c.state_mask[b * P + u];
          part.sync();
        }
      }
    }
    for (int64_t b = 0; b < rows; ++b) {
      for (int64_t u = 0; u < P; ++u) g.grad_h0[b * P + u] = grad_state[0][b * h_width + u];
      for (int64_t u = 0; u < H; ++u) g.grad_c0[b * H + u] = dc2[b * H + u] * 2.0f;
    }
  }

  // ---- weight gradients ---------------------------------------------------------------------

  // scale · a^T b over all R rows, read in place: each thread owns row tiles of the result and
  // runs over R in blocks that keep a block of b's vectors in L1; b's last vector of each row is
  // read only as far as the row goes.
  static void rows_product(const RowsProductArgs& r) {
    const int64_t width = round_up(r.n), block = 256;
#pragma omp parallel num_threads(team_size(r.threads))
    {
      const int64_t tile_count = (r.m + Tile::MR - 1) / Tile::MR;
      const Share share(tile_count, omp_get_thread_num(), omp_get_num_threads());
      const int64_t i0 = share.begin * Tile::MR, i1 = std::min(share.end * Tile::MR, r.m);
      if (i0 < i1 && r.R == 0)
        for (int64_t i = i0; i < i1; ++i) std::fill(r.c + i * r.ldc, r.c + i * r.ldc + width, 0.0f);
      for (int64_t k0 = 0; k0 < r.R && i0 < i1; k0 += block) {
        const Operands o{r.a + k0 * r.lda + i0, 1, r.lda, r.b + k0 * r.ldb, r.ldb, L,
                         std::min(block, r.R - k0)};
        tiles(o, i1 - i0, 0, width / L, {r.c + i0 * r.ldc, r.ldc, k0 > 0, r.scale},
              r.n - (width - L));
      }
    }
  }

  static Kernels kernels(const char* name) {
    return {name, Tile::VL, &forward, &backward, &rows_product};
  }
};

}  // namespace
