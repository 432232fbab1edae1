// The NEON loops (isa_neon.cpp: register tile 8 x 12) against the portable ones (isa_generic.cpp:
// 6 x 8) on the same random inputs: rows_product, forward (keep = true) and backward, over round
// counts, dense, low-rank and shared maps, with and without biases, odd sizes, batch rows,
// projections, packed batches of falling row counts, and every plan. Both tiles compute each element in the same order, so they agree to rounding.
// No ATen: built for aarch64 with the two isa files and run under qemu-user by
// tests/test_neon.py, since x86 CI cannot run NEON code.
//
// Every buffer ends at an inaccessible page, so a read or write past its end faults instead of
// passing unnoticed; outputs start as NaN, so an element left unwritten fails its comparison;
// parameter padding (ld > cols) is NaN, so reading it poisons the result; the inputs, and the
// forward's buffers under the backward, are read-only, so writing them faults. One line per
// check; exit status 1 if a check fails or the number of comparisons is not the expected one.

#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "chain.h"

namespace {

using namespace mogrifier_chain;

constexpr double TOLERANCE = 1e-5;  // ||neon - generic|| / ||generic||, float32
const float NaN = std::numeric_limits<float>::quiet_NaN();

// What runs now, for the message of a crash (a fault at a guard page).
char current[512] = "start";
std::string check_name;

// The check under way, and which variant's call in it runs now.
void running(const Kernels& kernels) {
  std::snprintf(current, sizeof current, "%s (%s)", check_name.c_str(), kernels.name);
}

void on_crash(int signal) {
  char line[640];
  const int n =
      std::snprintf(line, sizeof line, "FAIL crash (signal %d) in: %s\n", signal, current);
  if (write(STDOUT_FILENO, line, n) < 0) _exit(3);
  _exit(3);
}

// n floats ending at an inaccessible page; the mapping is this buffer's alone.
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t n, float fill = NaN) : n_(n) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t data_pages = (n * sizeof(float) + page - 1) / page;
    bytes_ = (data_pages + 1) * page;
    void* map = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) {
      std::perror("mmap");
      std::exit(2);
    }
    map_ = static_cast<char*>(map);
    if (mprotect(map_ + data_pages * page, page, PROT_NONE) != 0) {
      std::perror("mprotect");
      std::exit(2);
    }
    data_ = reinterpret_cast<float*>(map_ + data_pages * page) - n;
    std::fill(data_, data_ + n, fill);
  }
  Buffer(Buffer&& other) noexcept { *this = std::move(other); }
  Buffer& operator=(Buffer&& other) noexcept {
    std::swap(map_, other.map_);
    std::swap(bytes_, other.bytes_);
    std::swap(data_, other.data_);
    std::swap(n_, other.n_);
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() {
    if (map_ != nullptr) munmap(map_, bytes_);
  }

  float* data() const { return data_; }
  size_t size() const { return n_; }
  // Read-only from now on: a write faults.
  void freeze() const {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    if (bytes_ > page && mprotect(map_, bytes_ - page, PROT_READ) != 0) {
      std::perror("mprotect");
      std::exit(2);
    }
  }

 private:
  char* map_ = nullptr;
  size_t bytes_ = 0;
  float* data_ = nullptr;
  size_t n_ = 0;
};

using Rng = std::mt19937;

// Uniform in [-a, a], read-only.
Buffer random_buffer(size_t n, float a, Rng& rng) {
  Buffer b(n);
  std::uniform_real_distribution<float> uniform(-a, a);
  for (size_t i = 0; i < n; ++i) b.data()[i] = uniform(rng);
  b.freeze();
  return b;
}

// Rows of `width` elements, `ld` apart: a buffer's elements under comparison.
struct View {
  const float* data;
  int64_t rows, width, ld;
};
View whole(const Buffer& b) { return {b.data(), 1, static_cast<int64_t>(b.size()), 0}; }

// The checks so far: a check is one call of both kernels, with one comparison per buffer that
// the call writes.
struct Tally {
  int checks = 0, failed = 0;
  int64_t comparisons = 0;
  int values = 0;                // this check's comparisons of two results
  double worst = 0.0;            // and their largest relative error
  std::string worst_of, errors;  // which buffer; the failures' messages

  void begin(const std::string& what) {
    check_name = what;
    std::snprintf(current, sizeof current, "%s", what.c_str());
    values = 0;
    worst = 0.0;
    worst_of.clear();
    errors.clear();
  }
  // neon against generic (the reference), both rows x width: finite, the reference not all zero,
  // relative error within TOLERANCE.
  void compare(const char* name, View neon, View generic) {
    ++comparisons;
    ++values;
    double diff = 0.0, norm = 0.0;
    int64_t bad = 0;
    for (int64_t i = 0; i < generic.rows; ++i)
      for (int64_t c = 0; c < generic.width; ++c) {
        const double a = neon.data[i * neon.ld + c], b = generic.data[i * generic.ld + c];
        if (!std::isfinite(a) || !std::isfinite(b)) ++bad;
        diff += (a - b) * (a - b);
        norm += b * b;
      }
    const int64_t n = generic.rows * generic.width;
    char message[256];
    if (n == 0) {
      std::snprintf(message, sizeof message, " %s: compares nothing;", name);
    } else if (bad > 0) {
      std::snprintf(message, sizeof message, " %s: %lld of %lld not finite (unwritten?);", name,
                    static_cast<long long>(bad), static_cast<long long>(n));
    } else if (norm == 0.0) {
      std::snprintf(message, sizeof message, " %s: reference all zero;", name);
    } else {
      const double rel = std::sqrt(diff / norm);
      if (rel > worst) {
        worst = rel;
        worst_of = name;
      }
      if (rel <= TOLERANCE) return;
      std::snprintf(message, sizeof message, " %s: relative error %.3g (%lld elements);", name, rel,
                    static_cast<long long>(n));
    }
    errors += message;
  }
  // A condition that is not a comparison of two results.
  void expect(bool ok, const std::string& message) {
    ++comparisons;
    if (!ok) errors += " " + message + ";";
  }
  void end(const std::string& what) {
    ++checks;
    if (errors.empty()) {
      if (worst > 0.0)
        std::printf("ok   %s: worst %.2g (%s)\n", what.c_str(), worst, worst_of.c_str());
      else
        std::printf("ok   %s%s\n", what.c_str(), values ? ": identical" : "");
    } else {
      ++failed;
      std::printf("FAIL %s:%s\n", what.c_str(), errors.c_str());
    }
  }
};

// ---- the guard ----------------------------------------------------------------------------------

// Reading one float past a buffer's end kills the reader: the guard works here (under qemu too,
// which reports the child's fault on stderr).
void check_guard(Tally& tally) {
  const std::string what = "guard page faults a read past a buffer's end";
  tally.begin(what);
  Buffer b(5, 1.0f);
  std::fflush(stdout);
  const pid_t child = fork();
  if (child == 0) {
    const rlimit no_core{0, 0};
    setrlimit(RLIMIT_CORE, &no_core);
    signal(SIGSEGV, SIG_DFL);
    signal(SIGBUS, SIG_DFL);
    volatile float* p = b.data();
    const float past = p[b.size()];
    _exit(past == 12345.0f ? 4 : 0);
  }
  int status = 0;
  const bool waited = child > 0 && waitpid(child, &status, 0) == child;
  tally.expect(
      waited && WIFSIGNALED(status) && (WTERMSIG(status) == SIGSEGV || WTERMSIG(status) == SIGBUS),
      "the read past the end did not fault");
  tally.end(what);
}

// ---- rows_product -------------------------------------------------------------------------------

struct Shape {
  int64_t R, m, n;
};

// c = scale a^T b, a (R, m) and b (R, n) as rows lda > m and ldb > n apart (padding NaN), each
// ending exactly at its guard page; only c's first n columns are compared.
void check_rows_product(Tally& tally, const Kernels& neon, const Kernels& generic, Shape s,
                        int threads, Rng& rng) {
  const int64_t lda = s.m + 3, ldb = s.n + 5;
  char what[160];
  std::snprintf(what, sizeof what, "rows_product R=%lld m=%lld n=%lld threads=%d",
                static_cast<long long>(s.R), static_cast<long long>(s.m),
                static_cast<long long>(s.n), threads);
  tally.begin(what);
  auto padded = [&](int64_t rows, int64_t cols, int64_t ld) {
    Buffer buffer(rows == 0 ? 0 : (rows - 1) * ld + cols);
    std::uniform_real_distribution<float> uniform(-0.5f, 0.5f);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t c = 0; c < cols; ++c) buffer.data()[i * ld + c] = uniform(rng);
    buffer.freeze();
    return buffer;
  };
  const Buffer a = padded(s.R, s.m, lda), b = padded(s.R, s.n, ldb);
  const float scale = 0.75f;
  Buffer c[2];
  int64_t ldc[2];
  const Kernels* kernels[2] = {&neon, &generic};
  for (int k = 0; k < 2; ++k) {
    const int64_t vl = kernels[k]->vector_width;
    ldc[k] = (s.n + vl - 1) / vl * vl;
    c[k] = Buffer(s.m * ldc[k]);
    running(*kernels[k]);
    kernels[k]->rows_product(
        {a.data(), b.data(), lda, ldb, s.R, s.m, s.n, c[k].data(), ldc[k], scale, threads});
  }
  const View got{c[0].data(), s.m, s.n, ldc[0]}, want{c[1].data(), s.m, s.n, ldc[1]};
  if (s.R == 0) {  // an empty sum: zeros, which a relative error cannot judge
    bool zeros = true;
    for (const View& v : {got, want})
      for (int64_t i = 0; i < s.m; ++i)
        for (int64_t j = 0; j < s.n; ++j) zeros = zeros && v.data[i * v.ld + j] == 0.0f;
    tally.expect(zeros, "c not all zero over R = 0 rows");
  } else {
    tally.compare("c", got, want);
  }
  tally.end(what);
}

// ---- a layer ------------------------------------------------------------------------------------

// The rounds' maps: all dense, all low rank, or shared (odd rounds low rank, even rounds dense,
// round j >= 3 served by the stored map of round j - 2, as fused.py stores a map once).
enum class Maps { dense, low_rank, shared };
const char* const MAPS_NAMES[] = {"dense", "low-rank", "shared"};

struct Config {
  int64_t rounds;
  Maps maps;
  bool bias;
  int64_t T, B, I, H;
  Plan plan;
  int64_t P = 0;  // the projected state's width (proj_size); 0: no projection, h is H wide
  // A packed batch: rows per step (non-increasing, from B), each step's first row, and the
  // cells' (c_0's B rows first). Empty: padded, every step all B rows.
  std::vector<int64_t> batch_sizes, first, cell_first;

  Config with(int64_t proj, std::vector<int64_t> sizes) const {
    Config c = *this;
    c.P = proj;
    c.batch_sizes = std::move(sizes);
    if (!c.batch_sizes.empty()) {
      c.T = static_cast<int64_t>(c.batch_sizes.size());
      c.B = c.batch_sizes[0];
      int64_t row = 0;
      c.cell_first.push_back(0);
      for (int64_t n : c.batch_sizes) {
        c.first.push_back(row);
        c.cell_first.push_back(c.B + row);
        row += n;
      }
    }
    return c;
  }
  bool packed() const { return !batch_sizes.empty(); }
  int64_t state() const { return P ? P : H; }
  int64_t total_rows() const {
    int64_t n = 0;
    for (int64_t b : batch_sizes) n += b;
    return packed() ? n : T * B;
  }

  std::string name() const {
    char s[200];
    std::snprintf(s, sizeof s, "r=%lld %s %s T=%lld B=%lld I=%lld H=%lld %s threads=%d%s%s%s",
                  static_cast<long long>(rounds), MAPS_NAMES[static_cast<int>(maps)],
                  bias ? "bias" : "no-bias", static_cast<long long>(T), static_cast<long long>(B),
                  static_cast<long long>(I), static_cast<long long>(H),
                  plan.packed ? "packed" : "in-place", plan.threads,
                  plan.split_rows ? " split_rows" : "", P ? " projected" : "",
                  packed() ? " packed-batch" : "");
    return s;
  }
  // Width of state u_s (fused.py's _Structure.size).
  int64_t width(int64_t s) const { return s % 2 ? I : state(); }
  // Rank of round j's map, 0 when dense.
  int64_t rank(int64_t j) const {
    if (maps == Maps::dense || (maps == Maps::shared && j % 2 == 0)) return 0;
    return (j % 2 ? 3 : 5) + (H > 16 ? 8 : 0);
  }
  int64_t low_rank_rounds() const {
    int64_t n = 0;
    for (int64_t j = 1; j <= rounds; ++j) n += rank(j) > 0;
    return n;
  }
  // The comparisons a forward makes: output, c_last, states u_1 .. u_{r-2}, the inner values,
  // xh, one sigmoid per round, act, tanh_g2, tanh_c, cells2. A backward: grad_x, grad_h0,
  // grad_c0, grad_act, one grad_z per round, the inner values' gradients.
  // With a projection, one more each: the unprojected h, the projected h's gradient.
  int64_t forward_comparisons() const {
    return 2 + std::max<int64_t>(0, rounds - 2) + low_rank_rounds() + 1 + rounds + 4 + (P > 0);
  }
  int64_t backward_comparisons() const { return 4 + rounds + low_rank_rounds() + (P > 0); }
};

// d_s of fused.py: how many rounds have doubled state s.
int64_t doublings(int64_t s) { return std::max<int64_t>(0, (s + 1) / 2); }
float power_of_two(int64_t d) { return std::ldexp(1.0f, static_cast<int>(d)); }

// The parameters as stored, uniform in ±1/sqrt(fan in) so that nothing saturates; matrices
// rows ld apart, ld = cols + pad, the padding NaN.
struct Layer {
  Params params;
  std::vector<RoundMap> maps;
  std::vector<Buffer> storage;

  Layer(const Config& c, Rng& rng) {
    const int64_t pad = c.H > 16 ? 3 : 0;
    auto matrix = [&](int64_t rows, int64_t cols) {
      const int64_t ld = cols + pad;
      Buffer b((rows - 1) * ld + cols);
      std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
      const float a = 1.0f / std::sqrt(static_cast<float>(cols));
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) b.data()[i * ld + j] = a * uniform(rng);
      b.freeze();
      storage.push_back(std::move(b));
      return Matrix{storage.back().data(), rows, cols, ld};
    };
    auto vector = [&](int64_t n, float a) {
      storage.push_back(random_buffer(n, a, rng));
      return storage.back().data();
    };
    const int64_t r = c.rounds, I = c.I, H = c.H;
    params.input_size = I;
    params.hidden_size = H;
    params.state_size = c.state();
    params.rounds = r;
    params.w_ih = matrix(4 * H, I);
    params.w_hh = matrix(4 * H, c.state());
    if (c.P) params.w_hr = matrix(c.P, H);
    if (c.bias) {
      params.b_ih = vector(4 * H, 0.5f);
      params.b_hh = vector(4 * H, 0.5f);
    }
    const int64_t x_final = r % 2 ? r : r - 1, h_final = r % 2 ? r - 1 : r;
    params.scale_x = power_of_two(doublings(x_final));
    params.scale_h = power_of_two(doublings(h_final));
    for (int64_t j = 1; j <= r; ++j) {
      RoundMap m;
      if (c.maps == Maps::shared && j >= 3) {
        m = maps[j - 3];
      } else {
        const int64_t out = c.width(j), in = c.width(j - 1), k = c.rank(j);
        if (k == 0) {
          m.factor[0] = matrix(out, in);
        } else {
          m.factors = 2;
          m.factor[0] = matrix(out, k);
          m.factor[1] = matrix(k, in);
        }
        if (c.bias) m.bias = vector(out, 0.5f);
      }
      m.scale = power_of_two(doublings(j - 1));
      maps.push_back(m);
    }
    params.maps = maps.data();
  }
};

// A (blocks, B, width) buffer (NaN) and its Seq: one block is one step for all (step 0), as
// bindings.cpp passes a tensor with one block.
struct Sequence {
  Buffer buffer;
  Seq seq;
  Sequence() = default;
  Sequence(int64_t blocks, int64_t B, int64_t width)
      : buffer(blocks * B * width), seq{buffer.data(), blocks > 1 ? B * width : 0, width} {}
  View view() const { return whole(buffer); }
  // A buffer of every step's rows, width wide: (T, B, width) blocks, or a packed batch's rows
  // (cells: c_0's B rows first).
  static Sequence per_step(const Config& c, int64_t width, bool cells = false) {
    if (!c.packed()) return Sequence(c.T + (cells ? 1 : 0), c.B, width);
    Sequence s;
    s.buffer = Buffer(((cells ? c.B : 0) + c.total_rows()) * width);
    s.seq = {s.buffer.data(), 0, width, cells ? c.cell_first.data() : c.first.data()};
    return s;
  }
};

// fused.py's _Saved.empty for keep = true, in the order of _Saved.tensors().
struct SavedSet {
  std::vector<Sequence> states, inners, sig;  // states[s - 1]; inners[j - 1] (empty when dense)
  Sequence xh, act, tanh_g2, tanh_c, cells2, unprojected;  // unprojected: with a projection
  std::vector<Seq> state_seqs, inner_seqs, sig_seqs;
  Saved saved;

  SavedSet(const Config& c)
      : xh(Sequence::per_step(c, c.I + c.state())),
        act(Sequence::per_step(c, 4 * c.H)),
        tanh_g2(Sequence::per_step(c, c.H)),
        tanh_c(Sequence::per_step(c, c.H)),
        cells2(Sequence::per_step(c, c.H, true)) {
    if (c.P) unprojected = Sequence::per_step(c, c.H);
    for (int64_t s = 1; s + 1 < c.rounds; ++s) states.push_back(Sequence::per_step(c, c.width(s)));
    for (int64_t j = 1; j <= c.rounds; ++j) {
      inners.push_back(c.rank(j) ? Sequence::per_step(c, c.rank(j)) : Sequence());
      sig.push_back(Sequence::per_step(c, c.width(j)));
    }
    for (const Sequence& s : states) state_seqs.push_back(s.seq);
    for (const Sequence& s : inners) inner_seqs.push_back(s.seq);
    for (const Sequence& s : sig) sig_seqs.push_back(s.seq);
    saved = {xh.seq,     act.seq,           tanh_g2.seq,       tanh_c.seq,
             cells2.seq, state_seqs.data(), inner_seqs.data(), sig_seqs.data(),
             unprojected.seq};
  }
  void freeze() const {
    for (const auto* list : {&states, &inners, &sig})
      for (const Sequence& s : *list) s.buffer.freeze();
    for (const Sequence* s : {&xh, &act, &tanh_g2, &tanh_c, &cells2}) s->buffer.freeze();
    if (unprojected.buffer.size()) unprojected.buffer.freeze();
  }
};

// The Call's batch_sizes: a packed batch's, or null.
const int64_t* sizes(const Config& c) { return c.packed() ? c.batch_sizes.data() : nullptr; }

struct ForwardRun {
  Sequence output;
  Buffer c_last;
  SavedSet saved;

  ForwardRun(const Kernels& kernels, const Config& c, const Layer& layer, const Sequence& x,
             const Buffer& h0, const Buffer& c0)
      : output(Sequence::per_step(c, c.state())), c_last(c.B * c.H), saved(c) {
    running(kernels);
    const Call call{&layer.params, c.T,         c.B,         x.seq,  h0.data(),
                    output.seq,    saved.saved, c.plan,      sizes(c)};
    kernels.forward({call, c0.data(), c_last.data(), true});
  }
};

void compare_forward(Tally& tally, const Config& c, const ForwardRun& neon,
                     const ForwardRun& generic) {
  tally.compare("output", neon.output.view(), generic.output.view());
  tally.compare("c_last", whole(neon.c_last), whole(generic.c_last));
  const SavedSet &a = neon.saved, &b = generic.saved;
  std::string name;
  for (size_t s = 0; s < b.states.size(); ++s) {
    name = "u_" + std::to_string(s + 1);
    tally.compare(name.c_str(), a.states[s].view(), b.states[s].view());
  }
  for (int64_t j = 1; j <= c.rounds; ++j)
    if (c.rank(j)) {
      name = "inner_" + std::to_string(j);
      tally.compare(name.c_str(), a.inners[j - 1].view(), b.inners[j - 1].view());
    }
  tally.compare("xh", a.xh.view(), b.xh.view());
  for (int64_t j = 1; j <= c.rounds; ++j) {
    name = "sig_" + std::to_string(j);
    tally.compare(name.c_str(), a.sig[j - 1].view(), b.sig[j - 1].view());
  }
  tally.compare("act", a.act.view(), b.act.view());
  tally.compare("tanh_g2", a.tanh_g2.view(), b.tanh_g2.view());
  tally.compare("tanh_c", a.tanh_c.view(), b.tanh_c.view());
  tally.compare("cells2", a.cells2.view(), b.cells2.view());
  if (c.P) tally.compare("unprojected", a.unprojected.view(), b.unprojected.view());
}

// The backward's outputs as fused.py allocates them: grad_pre (T, B, 4H + the rounds' widths)
// holds grad_act, then each round's grad_z (bindings.cpp's chain_backward).
struct BackwardRun {
  Sequence grad_x;
  Buffer grad_h0, grad_c0;
  Sequence grad_pre;
  std::vector<Sequence> grad_inners;
  std::vector<Seq> grad_z_seqs, grad_inner_seqs;
  std::vector<int64_t> offsets;  // grad_z[j - 1]'s first column in grad_pre
  int64_t pre_width;

  // grad_act, each round's grad_z, then (with a projection) the projected h's gradient.
  static int64_t total_width(const Config& c) {
    int64_t w = 4 * c.H;
    for (int64_t j = 1; j <= c.rounds; ++j) w += c.width(j);
    return w + c.P;
  }

  BackwardRun(const Kernels& kernels, const Config& c, const Layer& layer, const Sequence& x,
              const Buffer& h0, const ForwardRun& forward, const Sequence& grad_output,
              const Buffer& grad_h, const Buffer& grad_c)
      : grad_x(Sequence::per_step(c, c.I)),
        grad_h0(c.B * c.state()),
        grad_c0(c.B * c.H),
        grad_pre(Sequence::per_step(c, total_width(c))),
        pre_width(total_width(c)) {
    const Seq& pre = grad_pre.seq;
    int64_t offset = 4 * c.H;
    for (int64_t j = 1; j <= c.rounds; ++j) {
      offsets.push_back(offset);
      grad_z_seqs.push_back({pre.base + offset, pre.step, pre.row, pre.first});
      offset += c.width(j);
      grad_inners.push_back(c.rank(j) ? Sequence::per_step(c, c.rank(j)) : Sequence());
    }
    offsets.push_back(offset);  // the projected h's gradient (width P, when there is one)
    const Seq grad_projected =
        c.P ? Seq{pre.base + offset, pre.step, pre.row, pre.first} : Seq{};
    for (const Sequence& s : grad_inners) grad_inner_seqs.push_back(s.seq);
    running(kernels);
    const Call call{&layer.params,       c.T,    c.B,     x.seq, h0.data(), forward.output.seq,
                    forward.saved.saved, c.plan, sizes(c)};
    kernels.backward({call, grad_output.seq, grad_h.data(), grad_c.data(), grad_x.seq,
                      grad_h0.data(), grad_c0.data(), grad_pre.seq, grad_z_seqs.data(),
                      grad_inner_seqs.data(), grad_projected});
  }
  // Columns [first, first + width) of grad_pre, over all rows.
  View columns(const Config& c, int64_t first, int64_t width) const {
    return {grad_pre.buffer.data() + first, c.total_rows(), width, pre_width};
  }
};

void compare_backward(Tally& tally, const Config& c, const BackwardRun& neon,
                      const BackwardRun& generic) {
  tally.compare("grad_x", neon.grad_x.view(), generic.grad_x.view());
  tally.compare("grad_h0", whole(neon.grad_h0), whole(generic.grad_h0));
  tally.compare("grad_c0", whole(neon.grad_c0), whole(generic.grad_c0));
  tally.compare("grad_act", neon.columns(c, 0, 4 * c.H), generic.columns(c, 0, 4 * c.H));
  std::string name;
  for (int64_t j = 1; j <= c.rounds; ++j) {
    const int64_t first = neon.offsets[j - 1], width = c.width(j);
    name = "grad_z_" + std::to_string(j);
    tally.compare(name.c_str(), neon.columns(c, first, width), generic.columns(c, first, width));
    if (c.rank(j)) {
      name = "grad_inner_" + std::to_string(j);
      tally.compare(name.c_str(), neon.grad_inners[j - 1].view(),
                    generic.grad_inners[j - 1].view());
    }
  }
  if (c.P) {
    const int64_t first = neon.offsets[c.rounds];
    tally.compare("grad_projected", neon.columns(c, first, c.P), generic.columns(c, first, c.P));
  }
}

Sequence random_sequence(const Config& c, int64_t width, Rng& rng) {
  Sequence s = Sequence::per_step(c, width);
  std::uniform_real_distribution<float> uniform(-0.5f, 0.5f);
  for (size_t i = 0; i < s.buffer.size(); ++i) s.buffer.data()[i] = uniform(rng);
  s.buffer.freeze();
  return s;
}

// One configuration: the forward of both kernels on the same inputs; then the backward of both
// on the generic forward's results (read-only), with the same random gradients.
void check_layer(Tally& tally, const Kernels& neon, const Kernels& generic, const Config& c,
                 Rng& rng) {
  const Layer layer(c, rng);
  const Sequence x = random_sequence(c, c.I, rng);
  const Buffer h0 = random_buffer(c.B * c.state(), 0.5f, rng);
  const Buffer c0 = random_buffer(c.B * c.H, 0.5f, rng);

  const std::string forward_what = "forward  " + c.name();
  tally.begin(forward_what);
  const ForwardRun want(generic, c, layer, x, h0, c0);
  const ForwardRun got(neon, c, layer, x, h0, c0);
  compare_forward(tally, c, got, want);
  tally.end(forward_what);

  want.output.buffer.freeze();
  want.saved.freeze();
  const Sequence grad_output = random_sequence(c, c.state(), rng);
  const Buffer grad_h = random_buffer(c.B * c.state(), 0.5f, rng);
  const Buffer grad_c = random_buffer(c.B * c.H, 0.5f, rng);
  const std::string backward_what = "backward " + c.name();
  tally.begin(backward_what);
  const BackwardRun want_grads(generic, c, layer, x, h0, want, grad_output, grad_h, grad_c);
  const BackwardRun got_grads(neon, c, layer, x, h0, want, grad_output, grad_h, grad_c);
  compare_backward(tally, c, got_grads, want_grads);
  tally.end(backward_what);
}

}  // namespace

int main() {
  setvbuf(stdout, nullptr, _IOLBF, 0);
  signal(SIGSEGV, on_crash);
  signal(SIGBUS, on_crash);
  signal(SIGFPE, on_crash);
  signal(SIGILL, on_crash);
  const Kernels& neon = neon_kernels();
  const Kernels& generic = generic_kernels();
  Tally tally;
  // The checks below: 2 of the setup, 12 shapes x 2 team sizes of rows_product, and a forward
  // and a backward for each of 240 + 36 layer configurations (a fixed number, so that a loop
  // which runs nothing fails). Each check's comparisons are counted from its configuration.
  constexpr int64_t ROWS_PRODUCTS = 24, LAYER_CONFIGS = 240 + 36;
  const int64_t expected_checks = 2 + ROWS_PRODUCTS + 2 * LAYER_CONFIGS;
  int64_t expected_comparisons = 0;
  Rng rng(20240611);

  tally.begin("kernels");
  tally.expect(std::string(neon.name) == "neon" && std::string(generic.name) == "generic",
               "names " + std::string(neon.name) + ", " + generic.name);
  tally.expect(neon.vector_width == 4 && generic.vector_width == 4, "vector widths not 4");
  tally.end(std::string("kernels ") + neon.name + " and " + generic.name);
  expected_comparisons += 2;

  check_guard(tally);
  expected_comparisons += 1;

  // m leaving every tail of the tiles' rows (8 and 6); n leaving 1 to 3 vectors of a 12-column
  // group, the last one whole or holding 1 to 3 columns; R past one block (256 rows), R = 1 and
  // the empty sum R = 0.
  const Shape shapes[] = {{1, 1, 1},     {1, 8, 12},    {1, 13, 25}, {2, 10, 6},
                          {7, 7, 23},    {19, 16, 24},  {33, 6, 4},  {64, 20, 50},
                          {300, 11, 37}, {257, 15, 31}, {5, 2, 2},   {0, 3, 5}};
  for (const Shape& s : shapes)
    for (int threads : {1, 2}) {
      check_rows_product(tally, neon, generic, s, threads, rng);
      expected_comparisons += 1;
    }

  // Every round count, map kind, bias, size and plan; batch rows in turn (1, 3, 19, 7, 14: tails
  // of the tiles' rows, split or not) and one step in every seventh configuration (periods
  // prime to the plans' 6, so each meets every plan).
  const Plan plans[] = {{1, false, true},  {2, false, true},  {2, true, true},
                        {1, false, false}, {2, false, false}, {2, true, false}};
  const int64_t sizes[][2] = {{7, 10}, {33, 50}};
  const int64_t batch_rows[] = {1, 3, 19, 7, 14};
  int64_t index = 0;
  for (int64_t rounds : {0, 1, 4, 5})
    for (Maps maps : {Maps::dense, Maps::low_rank, Maps::shared}) {
      if (rounds == 0 && maps != Maps::dense) continue;
      for (bool bias : {false, true})
        for (const auto& size : sizes)
          for (const Plan& plan : plans) {
            const int64_t steps = index % 7 == 3 ? 1 : 3, rows = batch_rows[index % 5];
            const Config c{rounds, maps, bias, steps, rows, size[0], size[1], plan};
            check_layer(tally, neon, generic, c, rng);
            expected_comparisons += c.forward_comparisons() + c.backward_comparisons();
            ++index;
          }
    }

  // Projections (P = 5 of H = 10, 19 of 50) and packed batches (rows per step falling from 14
  // or 7 to 1, tails of the tiles' rows at every step), apart and together, over the plans.
  const std::vector<int64_t> packed_sizes[] = {{14, 13, 11, 8, 8, 5, 2, 1}, {7, 7, 6, 3, 1}};
  for (int64_t rounds : {0, 1, 4, 5})
    for (int kind = 0; kind < 3; ++kind)
      for (int64_t s = 0; s < 3; ++s) {
        const auto& size = sizes[s % 2];
        const Plan& plan = plans[index % 6];
        const Config base{rounds, index % 2 ? Maps::low_rank : Maps::dense, true, 3,
                          batch_rows[index % 5], size[0], size[1], plan};
        const int64_t proj = kind == 1 ? 0 : (size[1] > 16 ? 19 : 5);
        const Config c = base.with(proj, kind == 0 ? std::vector<int64_t>{} : packed_sizes[s % 2]);
        check_layer(tally, neon, generic, c, rng);
        expected_comparisons += c.forward_comparisons() + c.backward_comparisons();
        ++index;
      }

  std::snprintf(current, sizeof current, "summary");
  const bool counts_ok =
      tally.checks == expected_checks && tally.comparisons == expected_comparisons;
  std::printf("%d checks, %lld comparisons (expected %lld and %lld), %d failed\n", tally.checks,
              static_cast<long long>(tally.comparisons), static_cast<long long>(expected_checks),
              static_cast<long long>(expected_comparisons), tally.failed);
  if (!counts_ok) std::printf("FAIL the number of checks or comparisons is not the expected one\n");
  const bool ok = counts_ok && tally.failed == 0 && tally.checks > 0;
  std::printf("%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
