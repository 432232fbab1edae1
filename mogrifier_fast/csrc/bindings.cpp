// The ops of backend "fused" (see backends/fused_chain.py): tensors checked and turned into the
// plain structs of chain.h, then handed to one instruction set's loops, chosen per call by name
// from the dispatch table below. The only file here that includes ATen.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "chain.h"

namespace {

using namespace mogrifier_chain;

// The dispatch table: every variant this architecture compiles, best first, and whether this
// CPU executes it. Adding an instruction set is one isa_*.cpp file and one row here.
struct Variant {
  const char* name;
  const Kernels& (*kernels)();
  bool (*runs_here)();
};

bool always() { return true; }
#if defined(__x86_64__)
bool has_avx512() { return __builtin_cpu_supports("avx512f"); }
bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
const Variant VARIANTS[] = {
    {"avx512", avx512_kernels, has_avx512},
    {"avx2", avx2_kernels, has_avx2},
    {"generic", generic_kernels, always},
};
#elif defined(__aarch64__)
const Variant VARIANTS[] = {
    {"neon", neon_kernels, always},
    {"generic", generic_kernels, always},
};
#else
const Variant VARIANTS[] = {{"generic", generic_kernels, always}};
#endif

const Kernels& kernels_for(const std::string& isa) {
  for (const Variant& v : VARIANTS)
    if (isa == v.name) {
      TORCH_CHECK(v.runs_here(), "mogrifier_fast: this CPU cannot run the '", isa,
                  "' loops (it lacks the instructions)");
      return v.kernels();
    }
  TORCH_CHECK(false, "mogrifier_fast: no loops for instruction set '", isa, "' in this build");
}

std::vector<std::string> isas() {
  std::vector<std::string> names;
  for (const Variant& v : VARIANTS)
    if (v.runs_here()) names.emplace_back(v.name);
  return names;
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> names;
  for (const Variant& v : VARIANTS) names.emplace_back(v.name);
  return names;
}

void check_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "mogrifier_fast: ", what,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

// How a call's buffers hold its steps: (T, B, width) blocks, or for a packed batch (its
// batch_sizes given) (R, width) rows, step t's from row first[t]; cells2 holds c_0's B rows
// before them (cell_first: 0, then B + first[t] for the cell step t writes).
struct Layout {
  std::vector<int64_t> batch_sizes, first, cell_first;

  explicit Layout(c10::IntArrayRef sizes) : batch_sizes(sizes.begin(), sizes.end()) {
    int64_t row = 0;
    for (size_t t = 0; t < batch_sizes.size(); ++t) {
      TORCH_CHECK(batch_sizes[t] >= 1 && (t == 0 || batch_sizes[t] <= batch_sizes[t - 1]),
                  "mogrifier_fast: batch_sizes must be positive and non-increasing");
      first.push_back(row);
      row += batch_sizes[t];
    }
    if (!batch_sizes.empty()) {
      cell_first.push_back(0);
      for (int64_t f : first) cell_first.push_back(batch_sizes[0] + f);
    }
  }
  bool packed() const { return !batch_sizes.empty(); }

  Seq seq(const at::Tensor& t, const char* what, int64_t offset = 0, bool cells = false) const {
    check_float(t, what);
    if (t.dim() == 2) {
      TORCH_CHECK(packed() && t.stride(1) == 1, "mogrifier_fast: ", what,
                  " is (rows, width): a packed batch's, which needs its batch_sizes and a "
                  "contiguous last dimension; got sizes ", t.sizes(), " strides ", t.strides());
      return {t.data_ptr<float>() + offset, 0, t.stride(0),
              cells ? cell_first.data() : first.data()};
    }
    TORCH_CHECK(t.dim() == 3 && t.stride(2) == 1, "mogrifier_fast: ", what,
                " must be (T, B, width) with a contiguous last dimension, got sizes ",
                t.sizes(), " strides ", t.strides());
    return {t.data_ptr<float>() + offset, t.size(0) > 1 ? t.stride(0) : 0, t.stride(1)};
  }
};

float* rows_of(const at::Tensor& t, const char* what) {
  check_float(t, what);
  TORCH_CHECK(t.is_contiguous(), "mogrifier_fast: ", what, " must be contiguous");
  return t.data_ptr<float>();
}

Matrix matrix(const at::Tensor& t, const char* what) {
  check_float(t, what);
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, "mogrifier_fast: ", what,
              " must be a matrix with contiguous rows, got sizes ", t.sizes(), " strides ",
              t.strides());
  return {t.data_ptr<float>(), t.size(0), t.size(1), t.stride(0)};
}

const float* optional_vector(const std::optional<at::Tensor>& t, const char* what) {
  return t.has_value() ? rows_of(*t, what) : nullptr;
}

// One call's parameters: [w_ih, w_hh, b_ih, b_hh, then each round's factors and bias, then
// w_hr or None];
// scales [x half, h half, then each round's input scale]; factors: 1 or 2 per round.
struct Layer {
  Params params;
  std::vector<RoundMap> maps;

  Layer(const c10::List<std::optional<at::Tensor>>& flat, c10::ArrayRef<double> scales,
        c10::IntArrayRef factors) {
    const int64_t rounds = static_cast<int64_t>(factors.size());
    TORCH_CHECK(scales.size() == factors.size() + 2, "mogrifier_fast: ", scales.size(),
                " scales for ", rounds, " rounds");
    auto at = [&](size_t i) -> std::optional<at::Tensor> {
      TORCH_CHECK(i < flat.size(), "mogrifier_fast: too few parameters");
      return flat.get(i);
    };
    const std::optional<at::Tensor> w_ih = at(0), w_hh = at(1);
    TORCH_CHECK(w_ih.has_value() && w_hh.has_value(), "mogrifier_fast: LSTM weights missing");
    params.w_ih = matrix(*w_ih, "weight_ih");
    params.w_hh = matrix(*w_hh, "weight_hh");
    params.b_ih = optional_vector(at(2), "bias_ih");
    params.b_hh = optional_vector(at(3), "bias_hh");
    TORCH_CHECK((params.b_ih == nullptr) == (params.b_hh == nullptr),
                "mogrifier_fast: both LSTM biases or neither");
    params.hidden_size = params.w_ih.rows / 4;
    params.state_size = params.w_hh.cols;
    params.input_size = params.w_ih.cols;
    params.rounds = rounds;
    params.scale_x = static_cast<float>(scales[0]);
    params.scale_h = static_cast<float>(scales[1]);
    size_t next = 4;
    for (int64_t j = 0; j < rounds; ++j) {
      RoundMap m;
      m.factors = static_cast<int>(factors[j]);
      TORCH_CHECK(m.factors == 1 || m.factors == 2, "mogrifier_fast: a round has 1 or 2 factors");
      for (int f = 0; f < m.factors; ++f) {
        const std::optional<at::Tensor> factor = at(next++);
        TORCH_CHECK(factor.has_value(), "mogrifier_fast: a round's factor is missing");
        m.factor[f] = matrix(*factor, "a mogrifier factor");
      }
      m.bias = optional_vector(at(next++), "a mogrifier bias");
      m.scale = static_cast<float>(scales[j + 2]);
      maps.push_back(m);
    }
    const std::optional<at::Tensor> w_hr = at(next++);
    if (w_hr.has_value()) params.w_hr = matrix(*w_hr, "weight_hr");
    TORCH_CHECK(next == flat.size(), "mogrifier_fast: ", flat.size(), " parameters, expected ",
                next);
    TORCH_CHECK(w_hr.has_value() ? params.w_hr.rows == params.state_size &&
                                       params.w_hr.cols == params.hidden_size
                                 : params.state_size == params.hidden_size,
                "mogrifier_fast: weight_hh's and weight_hr's shapes disagree");
    params.maps = maps.data();
  }
};

// The saved buffers, in the order of fused.py's _Saved.tensors(): states u_1 .. u_{r-2}, the
// low-rank rounds' inner values, xh, sig (one per round), act, tanh_g2, tanh_c, cells2, then
// unprojected with a projection and h_in with a state mask.
struct SavedBuffers {
  Saved saved;
  std::vector<Seq> states, inners, sig;

  SavedBuffers(at::TensorList tensors, const Params& p, const Layout& layout, bool masked) {
    size_t next = 0;
    auto take = [&](const char* what, bool cells = false) {
      TORCH_CHECK(next < tensors.size(), "mogrifier_fast: too few saved buffers");
      return layout.seq(tensors[next++], what, 0, cells);
    };
    for (int64_t s = 1; s + 1 < p.rounds; ++s) states.push_back(take("a saved state"));
    for (int64_t j = 0; j < p.rounds; ++j)
      inners.push_back(p.maps[j].factors == 2 ? take("a saved inner value") : Seq{});
    saved.xh = take("xh");
    for (int64_t j = 0; j < p.rounds; ++j) sig.push_back(take("a saved sigmoid"));
    saved.act = take("activations");
    saved.tanh_g2 = take("tanh_g2");
    saved.tanh_c = take("tanh_c");
    saved.cells2 = take("cells2", true);
    if (p.w_hr.data != nullptr) saved.unprojected = take("unprojected");
    if (masked) saved.h_in = take("h_in");
    TORCH_CHECK(next == tensors.size(), "mogrifier_fast: ", tensors.size(),
                " saved buffers, expected ", next);
    saved.states = states.data();
    saved.inners = inners.data();
    saved.sig = sig.data();
  }
};

// The arguments both ops share, decoded once: the layout, the parameters, the saved buffers,
// and the Call that points into them (so a LayerCall is built in place and never copied).
struct LayerCall {
  Layout layout;
  Layer layer;
  SavedBuffers buffers;
  Call call;

  LayerCall(const c10::List<std::optional<at::Tensor>>& flat, c10::ArrayRef<double> scales,
            c10::IntArrayRef factors, at::TensorList saved, const at::Tensor& x,
            const at::Tensor& h0, const at::Tensor& output, int64_t threads, bool split_rows,
            bool packed, c10::IntArrayRef batch_sizes,
            const std::optional<at::Tensor>& state_mask)
      : layout(batch_sizes),
        layer(flat, scales, factors),
        buffers(saved, layer.params, layout, state_mask.has_value()),
        call{&layer.params,
             layout.packed() ? static_cast<int64_t>(layout.batch_sizes.size()) : x.size(0),
             layout.packed() ? layout.batch_sizes[0] : x.size(1),
             layout.seq(x, "x"),
             rows_of(h0, "h0"),
             layout.seq(output, "output"),
             buffers.saved,
             Plan{static_cast<int>(std::max<int64_t>(1, threads)), split_rows, packed},
             layout.packed() ? layout.batch_sizes.data() : nullptr,
             optional_vector(state_mask, "state_mask")} {
    TORCH_CHECK(h0.size(0) == call.rows, "mogrifier_fast: h0 has ", h0.size(0), " rows, the ",
                "batch ", call.rows);
    TORCH_CHECK(!state_mask.has_value() || state_mask->sizes() == h0.sizes(),
                "mogrifier_fast: state_mask must be shaped as h0 ", h0.sizes(), ", got ",
                state_mask.has_value() ? state_mask->sizes() : h0.sizes());
  }
  LayerCall(const LayerCall&) = delete;
  LayerCall& operator=(const LayerCall&) = delete;
};

void chain_forward(const std::string& isa, const at::Tensor& x, const at::Tensor& h0,
                   const at::Tensor& c0, const c10::List<std::optional<at::Tensor>>& flat,
                   c10::ArrayRef<double> scales, c10::IntArrayRef factors,
                   at::TensorList saved, const at::Tensor& output, const at::Tensor& c_last,
                   bool keep, int64_t threads, bool split_rows, bool packed,
                   c10::IntArrayRef batch_sizes, const std::optional<at::Tensor>& state_mask) {
  const Kernels& kernels = kernels_for(isa);
  const LayerCall c(flat, scales, factors, saved, x, h0, output, threads, split_rows, packed,
                    batch_sizes, state_mask);
  kernels.forward({c.call, rows_of(c0, "c0"), rows_of(c_last, "c_last"), keep});
}

void chain_backward(const std::string& isa, const at::Tensor& grad_output,
                    const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& x,
                    const at::Tensor& h0, const at::Tensor& output,
                    const c10::List<std::optional<at::Tensor>>& flat,
                    c10::ArrayRef<double> scales, c10::IntArrayRef factors,
                    at::TensorList saved, const at::Tensor& grad_x, const at::Tensor& grad_h0,
                    const at::Tensor& grad_c0, const at::Tensor& grad_pre,
                    const c10::List<std::optional<at::Tensor>>& grad_inners, int64_t threads,
                    bool split_rows, bool packed, c10::IntArrayRef batch_sizes,
                    const std::optional<at::Tensor>& state_mask) {
  const Kernels& kernels = kernels_for(isa);
  const LayerCall c(flat, scales, factors, saved, x, h0, output, threads, split_rows, packed,
                    batch_sizes, state_mask);
  const Layout& layout = c.layout;
  const Params& p = c.layer.params;
  // grad_pre: the gates' pre-activation gradients (4H wide), then each round's.
  std::vector<Seq> grad_z, grad_inner;
  int64_t offset = 4 * p.hidden_size;
  for (int64_t j = 1; j <= p.rounds; ++j) {
    grad_z.push_back(layout.seq(grad_pre, "grad_pre", offset));
    offset += j % 2 ? p.input_size : p.state_size;
    const std::optional<at::Tensor> inner = grad_inners.get(j - 1);
    grad_inner.push_back(inner.has_value() ? layout.seq(*inner, "a grad inner") : Seq{});
  }
  // With a projection, grad_pre ends with the projected h's gradient (P wide).
  Seq grad_projected;
  if (p.w_hr.data != nullptr) {
    grad_projected = layout.seq(grad_pre, "grad_pre", offset);
    offset += p.state_size;
  }
  TORCH_CHECK(grad_pre.size(-1) == offset, "mogrifier_fast: grad_pre is ", grad_pre.size(-1),
              " wide, expected ", offset);
  kernels.backward({c.call, layout.seq(grad_output, "grad_output"), rows_of(grad_h, "grad_h"),
                    rows_of(grad_c, "grad_c"), layout.seq(grad_x, "grad_x"),
                    rows_of(grad_h0, "grad_h0"), rows_of(grad_c0, "grad_c0"),
                    layout.seq(grad_pre, "grad_pre"), grad_z.data(), grad_inner.data(),
                    grad_projected});
}

at::Tensor rows_product(const std::string& isa, const at::Tensor& a, const at::Tensor& b,
                        double scale, int64_t threads) {
  const Kernels& kernels = kernels_for(isa);
  check_float(a, "a");
  check_float(b, "b");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0), "rows_product: shapes ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.stride(1) == 1 && b.stride(1) == 1, "rows_product: rows must be contiguous");
  const int64_t m = a.size(1), n = b.size(1), vl = kernels.vector_width;
  const int64_t width = (n + vl - 1) / vl * vl;
  at::Tensor c = at::empty({m, width}, a.options());
  const int team = static_cast<int>(std::max<int64_t>(1, threads));
  kernels.rows_product({a.data_ptr<float>(), b.data_ptr<float>(), a.stride(0), b.stride(0),
                        a.size(0), m, n, c.data_ptr<float>(), width, static_cast<float>(scale),
                        team});
  return width == n ? c : c.narrow(1, 0, n);
}

}  // namespace

TORCH_LIBRARY(mogrifier_fast, m) {
  m.def("isas() -> str[]", &isas);
  m.def("compiled_isas() -> str[]", &compiled_isas);
  m.def(
      "chain_forward(str isa, Tensor x, Tensor h0, Tensor c0, Tensor?[] params, float[] scales, "
      "int[] factors, Tensor(a!)[] saved, Tensor(b!) output, Tensor(c!) c_last, bool keep, "
      "int threads, bool split_rows, bool packed, int[] batch_sizes, Tensor? state_mask) -> ()");
  m.def(
      "chain_backward(str isa, Tensor grad_output, Tensor grad_h, Tensor grad_c, Tensor x, "
      "Tensor h0, Tensor output, Tensor?[] params, float[] scales, int[] factors, "
      "Tensor[] saved, Tensor(a!) grad_x, Tensor(b!) grad_h0, Tensor(c!) grad_c0, "
      "Tensor(d!) grad_pre, Tensor(e!)?[] grad_inners, int threads, bool split_rows, "
      "bool packed, int[] batch_sizes, Tensor? state_mask) -> ()");
  m.def("rows_product(str isa, Tensor a, Tensor b, float scale, int threads) -> Tensor");
}

TORCH_LIBRARY_IMPL(mogrifier_fast, CPU, m) {
  m.impl("chain_forward", chain_forward);
  m.impl("chain_backward", chain_backward);
  m.impl("rows_product", rows_product);
}
