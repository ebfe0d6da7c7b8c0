// gradviz's native recorder: the backward half of gradviz.capture, in C++, for steps whose
// autograd graph has a shape learnt before (see gradviz/native.py and DESIGN.md 4).
//
// The Python recorder learns a pass: which autograd node gets which hook, and which series
// each hook measures (its plan). learn(outputs, hooks, groups, params) walks the autograd
// graph from the root module's outputs and keeps the plan by the walk's shape: every node's
// type (a custom autograd.Function's class), its inputs' places in the walk and output
// indices, and each parameter leaf's identity. On a later pass, arm(outputs) walks again,
// and if the shape is one it learnt, puts a C++ post-hook on the planned nodes: no Python
// forward hook runs for the layers, no Python runs in backward. The hooks take each norm
// with a plain loop over the floats (no dispatch, no output tensor) and keep only the
// numbers, with each value's series (history column), in the order they arrived: what the
// Python hooks would have appended to Recorder._pending. take() ends the step: parameter
// gradients' norms, then those values, in one row, and a number for its layout.
//
// Forward statistics (record(..., activation_stats=True)) need each layer's output, so they
// keep one slim Python forward hook per layer and per activation module; each calls stat()
// or unit() here, which take the numbers in one pass over the floats (capture._layer_stats
// and _unit_stat, without a dispatch per op) and append them after the hooks' values.
#include <torch/extension.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/Exceptions.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <set>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <unordered_map>
#include <utility>
#include <vector>

using torch::autograd::AccumulateGrad;
using torch::autograd::FunctionPostHook;
using torch::autograd::Node;
using torch::autograd::variable_list;

namespace {

constexpr uint64_t NONE = UINT64_MAX;
constexpr int64_t CHUNK = 1 << 18;   // a larger gradient is read in chunks this size, in parallel
constexpr size_t MAX_PLANS = 32;       // as gradviz.capture.MAX_PLANS

// The loops over floats below are written so that the compiler vectorises them; on x86-64
// each is also compiled for AVX2 and FMA (x86-64-v3), picked at load time where the CPU has
// them: twice as many lanes per instruction.
// (GCC 12 or later: "arch=x86-64-v3" in target_clones is new there)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && \
    defined(__GLIBC__)
#define GV_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define GV_INLINE __attribute__((always_inline)) inline  // (into each clone)
#else
#define GV_CLONES
#define GV_INLINE inline
#endif

// Squares summed in 64 float lanes over blocks of 1024 values, each lane's block sums then
// added to its own double lane, and the double lanes summed once at the end, as a tree (the
// compiler vectorises all three; a block's 64 float sums added one by one in order were a
// chain of 64 dependent additions per 1024 values: three quarters of the loop's time). The
// values are cut in 4 parts read side by side, each with its own lanes: 4 streams keep more
// reads in flight than one (a 2 MB gradient just written: 45 to 37 us). (An AVX-512 clone
// read it in 31 us, but the optimizer step after rec.step() then took ~5 us longer on the
// small MLP: the core's switch to 512-bit vectors and back. Not worth it.) A result that
// is not finite or so small that a square may have underflowed in float32 is taken again,
// in double throughout.
GV_CLONES double sum_sq(const float* p, int64_t n) {
  constexpr int S = 4, L = 64;
  const int64_t part = n / S / 1024 * 1024;  // (each stream's values: whole blocks)
  double wide[S * L] = {0};
  for (int64_t i = 0; i < part; i += 1024) {
    float lane[S][L] = {{0}};
    for (int64_t j = i; j < i + 1024; j += L)
      for (int s = 0; s < S; ++s)
        for (int k = 0; k < L; ++k) {
          const float v = p[s * part + j + k];
          lane[s][k] += v * v;
        }
    for (int s = 0; s < S; ++s)
      for (int k = 0; k < L; ++k) wide[s * L + k] += lane[s][k];
  }
  int64_t i = S * part;  // what is left (under 4 blocks, and the tail): one stream
  for (; i + 1024 <= n; i += 1024) {
    float lane[L] = {0};
    for (int64_t j = i; j < i + 1024; j += L)
      for (int k = 0; k < L; ++k) lane[k] += p[j + k] * p[j + k];
    for (int k = 0; k < L; ++k) wide[k] += lane[k];
  }
  for (int w = S * L / 2; w > 0; w /= 2)  // (a tree: each level vectorised, no long chain)
    for (int k = 0; k < w; ++k) wide[k] += wide[k + w];
  double total = wide[0];
  for (; i < n; ++i) total += static_cast<double>(p[i]) * p[i];
  return total;
}

template <typename T>
double sum_sq_wide(const T* p, int64_t n) {
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += static_cast<double>(p[i]) * p[i];
  return total;
}

// A sum over a large array in chunks of CHUNK values, read by torch's threads at once,
// their sums added in order: the same chunks, so the same number, whatever the threads.
template <typename T, typename Sum>
double chunked(const T* p, int64_t n, Sum sum) {
  if (n <= CHUNK) return sum(p, n);
  std::vector<double> part((n + CHUNK - 1) / CHUNK);
  at::parallel_for(0, static_cast<int64_t>(part.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) part[c] = sum(p + c * CHUNK, std::min(CHUNK, n - c * CHUNK));
  });
  double total = 0;
  for (double v : part) total += v;
  return total;
}

// The L2 norm as gradviz.capture._norm takes it, as a float32 number: float32 and float64
// gradients on the CPU by the loops above, anything else (half precision, strided, sparse,
// on a GPU) by torch's op, reduced in float32 (float64: in float64, then converted).
float l2(const at::Tensor& g) {
  at::Tensor t = g;
  if (t.is_sparse()) t = t.coalesce().values();
  if (t.is_complex()) t = at::view_as_real(t.resolve_conj());  // (capture._plain)
  const int64_t n = t.numel();
  if (t.is_cpu() && t.is_contiguous()) {
    if (t.scalar_type() == at::kFloat) {
      const float* p = t.const_data_ptr<float>();
      double total = chunked(p, n, sum_sq);
      if (!std::isfinite(total) || total < 1e-30) total = chunked(p, n, sum_sq_wide<float>);
      return static_cast<float>(std::sqrt(total));
    }
    if (t.scalar_type() == at::kDouble)
      return static_cast<float>(
          std::sqrt(chunked(t.const_data_ptr<double>(), n, sum_sq_wide<double>)));
  }
  if (t.scalar_type() == at::kDouble)
    return static_cast<float>(at::linalg_vector_norm(t, 2).item<double>());
  float v = at::linalg_vector_norm(t, 2, c10::nullopt, false, at::kFloat).item<float>();
  if (v == 0 || std::isinf(v))  // float32 squares may have under- or overflowed: again in double
    v = static_cast<float>(at::linalg_vector_norm(t.to(at::kDouble), 2).item<double>());
  return v;
}

// -- forward statistics ------------------------------------------------------------------

// A layer output's mean, std, min, max and fraction of exact zeros (capture._layer_stats):
// sums in 16 double lanes per block of 1024 values (vectorised), min and max exact; NaN
// anywhere makes min and max NaN (as torch.aminmax) and counts as not zero (as x != 0);
// -0.0 counts as zero. The std is the two-pass one, in double throughout: no float32
// square overflows or underflows there, and a mean rounded to float32 would bias it
// (values 1e4 apart by 1e-3: the rounding of the mean is as large as the spread).
template <typename T>
GV_INLINE std::array<float, 5> layer_stats(const T* p, int64_t n) {
  constexpr int L = 16;
  double sum = 0;
  int64_t zeros = 0, nans = 0;
  T lo = p[0], hi = p[0];
  for (int64_t i = 0; i < n; i += 1024) {
    const int64_t end = std::min<int64_t>(n, i + 1024);
    double s[L] = {0};
    T mn[L], mx[L];
    int32_t z[L] = {0}, nn[L] = {0};
    for (int k = 0; k < L; ++k) mn[k] = mx[k] = p[i];
    int64_t j = i;
    for (; j + L <= end; j += L)
      for (int k = 0; k < L; ++k) {
        const T v = p[j + k];
        s[k] += static_cast<double>(v);
        z[k] += v == 0;
        nn[k] += v != v;
        mn[k] = v < mn[k] ? v : mn[k];
        mx[k] = v > mx[k] ? v : mx[k];
      }
    double block = 0;
    for (; j < end; ++j) {
      const T v = p[j];
      block += static_cast<double>(v);
      zeros += v == 0;
      nans += v != v;
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
    for (int k = 0; k < L; ++k) {
      block += s[k];
      zeros += z[k];
      nans += nn[k];
      lo = mn[k] < lo ? mn[k] : lo;
      hi = mx[k] > hi ? mx[k] : hi;
    }
    sum += block;
  }
  const double mean = sum / static_cast<double>(n);
  double sq = 0;
  if (n > 1) {
    for (int64_t i = 0; i < n; i += 1024) {
      const int64_t end = std::min<int64_t>(n, i + 1024);
      double q[L] = {0};
      int64_t j = i;
      for (; j + L <= end; j += L)
        for (int k = 0; k < L; ++k) {
          const double d = static_cast<double>(p[j + k]) - mean;
          q[k] += d * d;
        }
      double block = 0;
      for (; j < end; ++j) block += (p[j] - mean) * (p[j] - mean);
      for (double v : q) block += v;
      sq += block;
    }
  }
  const double std = n > 1 ? std::sqrt(sq / static_cast<double>(n - 1)) : 0.0;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  return {static_cast<float>(mean), static_cast<float>(std),
          nans ? nan : static_cast<float>(lo), nans ? nan : static_cast<float>(hi),
          static_cast<float>(static_cast<double>(zeros) / static_cast<double>(n))};
}

// ReLU: the fraction of units (columns of [batch, units]) zero for every sample, as
// (amax over the batch == 0), a NaN keeping a unit alive.
template <typename T>
GV_INLINE float dead_frac(const T* p, int64_t rows, int64_t cols) {
  std::vector<T> mx(p, p + cols);
  for (int64_t r = 1; r < rows; ++r) {
    const T* q = p + r * cols;
    for (int64_t j = 0; j < cols; ++j) mx[j] = (q[j] > mx[j] || q[j] != q[j]) ? q[j] : mx[j];
  }
  int64_t dead = 0;
  for (T v : mx) dead += v == 0;
  return static_cast<float>(static_cast<double>(dead) / static_cast<double>(cols));
}

// sigmoid/tanh: the fraction of values within margin of a bound (lo, hi: already in the
// output's dtype, see in_dtype).
template <typename T>
GV_INLINE float near_frac(const T* p, int64_t n, double lo, double hi) {
  const T a = static_cast<T>(lo), b = static_cast<T>(hi);
  int64_t near = 0;
  for (int64_t i = 0; i < n; i += 1 << 20) {  // (32-bit counts vectorise best)
    const int64_t end = std::min<int64_t>(n, i + (1 << 20));
    int32_t c = 0;
    for (int64_t j = i; j < end; ++j) c += (p[j] <= a) | (p[j] >= b);
    near += c;
  }
  return static_cast<float>(static_cast<double>(near) / static_cast<double>(n));
}

// Each statistic on a float32 or float64 tensor's values (see GV_CLONES).
template <typename T>
GV_CLONES std::array<float, 5> layer_stats_of(const T* p, int64_t n) { return layer_stats(p, n); }
template <typename T>
GV_CLONES float dead_frac_of(const T* p, int64_t rows, int64_t cols) {
  return dead_frac(p, rows, cols);
}
template <typename T>
GV_CLONES float near_frac_of(const T* p, int64_t n, double lo, double hi) {
  return near_frac(p, n, lo, hi);
}

// A bound as torch compares a tensor with a Python number: rounded to the tensor's dtype
// (bfloat16(0.99) is 0.98828125); float32 and float64 data are compared in their own type.
double in_dtype(double v, at::ScalarType dtype) {
  if (dtype == at::kHalf) return static_cast<float>(static_cast<at::Half>(v));
  if (dtype == at::kBFloat16) return static_cast<float>(static_cast<at::BFloat16>(v));
  return v;
}

// A float32 or float64 CPU tensor, contiguous (anything else converted: float32).
at::Tensor floats(const at::Tensor& t) {
  at::Tensor x = t.detach();
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) x = x.to(at::kFloat);
  return x.contiguous();
}

// An autograd node as Tensor::grad_fn() holds it (std::shared_ptr in older torch, an
// intrusive_ptr in newer), and its weak counterpart.
using NodeRef = std::decay_t<decltype(std::declval<const at::Tensor&>().grad_fn())>;
template <typename P>
struct WeakOf;
template <typename N>
struct WeakOf<std::shared_ptr<N>> {
  using type = std::weak_ptr<N>;
};
template <typename N, typename Null>
struct WeakOf<c10::intrusive_ptr<N, Null>> {
  using type = c10::weak_intrusive_ptr<N, Null>;
};
using WeakNode = WeakOf<NodeRef>::type;

struct Activation {  // an activation module's unit statistic
  int kind;          // 0: dead (ReLU), 1: saturated (bounds)
  double lo, hi;     // saturated: a value <= lo or >= hi (bound +- margin)
};

// What the forward hooks left this step: values and, per statistic, its columns (key: a
// count, then that many columns, per statistic), in the order the hooks ran.
struct Stats {
  std::vector<std::array<int64_t, 5>> layer_cols;  // by layer slot
  std::vector<Activation> acts;                    // by activation slot
  std::map<std::pair<int64_t, int>, int64_t> unit_cols;  // (layer slot, kind) -> column
  // which layer made an output's autograd node this pass (to credit an activation's
  // statistic to it); weak, so a dead node is no match (cleared at each pass's end)
  std::unordered_map<Node*, std::pair<WeakNode, int64_t>> made_by;
  std::vector<int64_t> key;
  std::vector<float> vals;
  size_t key_from = 0, vals_from = 0;  // where this root pass's statistics start
  bool in_root = false;

  void clear() {
    key.clear();
    vals.clear();
    made_by.clear();
    key_from = vals_from = 0;
    in_root = false;
  }
};

// Whether a forward hook should take statistics now: as capture's hooks, only with grad
// enabled, not in backward (activation checkpointing re-runs forwards there) and not
// inside a torch.func transform (vmap, grad: its tensors are batched or wrapped).
bool recording_forward() {
  // (functorch includes this key while its stack of transforms is not empty; its header,
  // with maybeCurrentDynamicLayer, needs headers that torch does not ship)
  return at::GradMode::is_enabled() && torch::autograd::get_current_graph_task_id() == -1 &&
         !c10::impl::tls_is_dispatch_key_included(
             c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

struct Spec {  // one hooked node: what it measures
  std::vector<std::pair<int64_t, int64_t>> outs;           // (output index or -1, column)
  std::vector<std::tuple<int64_t, int64_t, int64_t>> ins;  // (input index, column, group)
  bool operator==(const Spec& o) const { return outs == o.outs && ins == o.ins; }
};

struct Plan {
  std::vector<uint64_t> shape;
  // (place in walk, spec): one block, which each armed pass keeps alive for its hooks
  using Hooks = std::vector<std::pair<int64_t, Spec>>;
  std::shared_ptr<const Hooks> hooks = std::make_shared<const Hooks>();
  std::vector<std::pair<int64_t, int64_t>> groups;  // (column, parts)
  // Two passes of this shape had different plans in Python (they differ in what the walk
  // cannot see: which parameter-free module ran): never armed, always Python.
  bool ambiguous = false;

  bool same(const Plan& o) const {
    return groups == o.groups && *hooks == *o.hooks;
  }
};

struct Pass;

using WeakTensor = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct State {
  std::vector<int64_t> cols;  // this step's values, in the order they arrived
  std::vector<float> vals;
  // The last gradient measured (weakly: holding it would keep its memory from the next
  // node's outputs, and move the user's tensors about in memory for a few steps), its
  // version and norm.
  WeakTensor last{c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
  int64_t last_version = -1;
  float last_norm = 0;
  std::vector<std::shared_ptr<Pass>> passes;  // this step's armed passes
  bool miss_reached = false;  // a pass not armed (a shape not learnt) got a gradient
  std::string error;          // the first error in a hook: the Python side stops recording
  // Trainable parameters' AccumulateGrad nodes (held: every graph uses these), and whether
  // the backward (graph task) seen last fills .grad: see loss_backward.
  std::vector<c10::intrusive_ptr<Node>> accs;
  int64_t task_seen = -2;
  bool task_ok = true;

  // Whether the gradients arriving now count (capture._loss_backward): decided once a task.
  bool counts() {
    int64_t task = torch::autograd::get_current_graph_task_id();
    if (task != task_seen) {
      task_seen = task;
      task_ok = loss_backward();
    }
    return task_ok;
  }

  // As capture._loss_backward: a backward with create_graph (grad mode on in its hooks)
  // counts only if it will accumulate into one of the nodes (torch._C.
  // _will_engine_execute_node, where a gradient torch.autograd.grad captures is not one):
  // a gradient penalty's torch.autograd.grad runs the same hooks. One without counts if it
  // runs every node (backward() without inputs=: no exec_info) or takes a parameter's
  // gradient (fills it, or captures it for torch.autograd.grad(loss, params)); not an
  // adversarial example's torch.autograd.grad(loss, x). Python tells "runs every node"
  // from the node running now (capture._limited); here exec_info says it.
  bool loss_backward() const {
    if (accs.empty()) return true;
    const auto* info = torch::autograd::get_current_graph_task_exec_info();
    const auto* nodes = torch::autograd::get_current_graph_task_nodes_in_graph();
    if (info == nullptr || nodes == nullptr) return true;
    const bool create_graph = at::GradMode::is_enabled();
    if (!create_graph && info->empty()) return true;
    bool any = false;  // (none in the graph: the model was converted, .double() or .to())
    for (const auto& acc : accs) {
      Node* node = acc.get();
      if (nodes->find(node) == nodes->end()) continue;
      any = true;
      if (info->empty()) return true;  // backward() without inputs=: runs every node
      auto it = info->find(node);
      if (it == info->end()) continue;
      if (it->second.needed_ || (!create_graph && it->second.captures_)) return true;
    }
    if (create_graph || any) return false;
    // None in the graph (the model converted since, or only frozen layers in it): count it
    // unless it runs only the nodes on the way to some inputs (an adversarial example's
    // torch.autograd.grad(loss, x)): then a node of its graph will not run
    for (Node* node : *nodes) {
      auto it = info->find(node);
      if (it == info->end() || !it->second.should_execute()) return false;
    }
    return true;
  }

  void emit(int64_t col, const at::Tensor& g) {
    // Autograd often hands the same tensor to several hooks in a row (see capture._emit).
    float v;
    if (!last.expired() && last._unsafe_get_target() == g.unsafeGetTensorImpl() &&
        last_version == static_cast<int64_t>(g._version())) {
      v = last_norm;
    } else {
      v = l2(g);
      last = WeakTensor(g.getIntrusivePtr());
      last_version = g._version();
      last_norm = v;
    }
    cols.push_back(col);
    vals.push_back(v);
  }
};

struct Pass {  // one armed pass: its series that arrive in parts
  std::vector<int64_t> col, left, parts;
  std::vector<at::Tensor> sum;
  bool open = true;
  std::shared_ptr<const Plan::Hooks> specs;  // (its hooks' specs: one count for them all)

  explicit Pass(const Plan& plan) : specs(plan.hooks) {
    for (const auto& [c, n] : plan.groups) {
      col.push_back(c);
      left.push_back(n);
      parts.push_back(n);
      sum.emplace_back();
    }
  }

  void add(size_t gi, const at::Tensor& g, State& st, bool minus) {
    if (minus) {  // (an inner port's: it comes before the part that closes the group)
      sum[gi] = sum[gi].defined() ? sum[gi] - g : -g;
      return;
    }
    sum[gi] = sum[gi].defined() ? sum[gi] + g : g.clone();
    if (--left[gi] == 0) {  // complete: measure it, and be ready for another backward
      st.emit(col[gi], sum[gi]);
      sum[gi] = at::Tensor();
      left[gi] = parts[gi];
    }
  }

  void close(State& st, bool record) {  // parts that never completed count as they are
    open = false;
    for (size_t gi = 0; gi < sum.size(); ++gi)
      if (sum[gi].defined()) {
        // (only parts taken off: the output's own gradient never came, as in capture)
        if (record && left[gi] < parts[gi]) st.emit(col[gi], sum[gi]);
        sum[gi] = at::Tensor();
      }
  }
};

struct Hook : FunctionPostHook {
  std::shared_ptr<State> st;
  std::shared_ptr<Pass> pass;
  const Spec* spec;  // (in pass->specs)

  Hook(std::shared_ptr<State> s, std::shared_ptr<Pass> p, const Spec* sp)
      : st(std::move(s)), pass(std::move(p)), spec(sp) {}

  variable_list operator()(const variable_list& grad_inputs,
                           const variable_list& grad_outputs) override {
    if (!pass->open || !st->error.empty() || !st->counts()) return grad_inputs;
    try {
      at::NoGradGuard no_grad;  // (create_graph=True: no gradient sum joins the graph)
      for (const auto& [nr, col] : spec->outs) {
        if (nr >= 0) {
          if (static_cast<size_t>(nr) < grad_outputs.size() && grad_outputs[nr].defined())
            st->emit(col, grad_outputs[nr]);
        } else {
          for (const auto& g : grad_outputs)
            if (g.defined()) st->emit(col, g);
        }
      }
      for (const auto& [index, col, gi] : spec->ins) {
        // (index < 0: grad_outputs[-1 - index]; group -2 - g: taken from group g, as
        // capture._Plan says)
        const variable_list& side = index >= 0 ? grad_inputs : grad_outputs;
        const auto k = static_cast<size_t>(index >= 0 ? index : -1 - index);
        if (k >= side.size() || !side[k].defined()) continue;
        if (gi == -1)
          st->emit(col, side[k]);
        else if (gi >= 0)
          pass->add(static_cast<size_t>(gi), side[k], *st, false);
        else
          pass->add(static_cast<size_t>(-2 - gi), side[k], *st, true);
      }
    } catch (const std::exception& e) {  // never break the user's backward
      if (st->error.empty()) st->error = std::string("in backward: ") + e.what();
    }
    return grad_inputs;
  }
};

// A pass not armed: whether the loss reaches it (a forward without backward is no miss).
struct MissHook : FunctionPostHook {
  std::shared_ptr<State> st;
  explicit MissHook(std::shared_ptr<State> s) : st(std::move(s)) {}
  variable_list operator()(const variable_list& grad_inputs, const variable_list&) override {
    if (st->counts()) st->miss_reached = true;
    return grad_inputs;
  }
};

// The parameters' TensorImpls, sorted: a binary search over one small array (cold, on a
// step recorded 1 in N, a hash set's buckets and nodes cost a cache miss each).
struct Params {
  std::vector<const c10::TensorImpl*> sorted;
  void insert(const c10::TensorImpl* p) {
    sorted.insert(std::upper_bound(sorted.begin(), sorted.end(), p), p);
  }
  bool count(const c10::TensorImpl* p) const {
    return std::binary_search(sorted.begin(), sorted.end(), p);
  }
};

// What kind() needs of a node's class, found once per class: dynamic_cast and hash_code
// read the class's name and its bases' (strings cold in memory on a step recorded 1 in N).
struct TypeKind {
  const std::type_info* type = nullptr;
  bool accumulate = false;  // an AccumulateGrad (or a subclass): a leaf
  bool py = false;          // a torch::autograd::PyNode: a custom autograd.Function
  uint64_t hash = 0;
};

// The classes seen, by their type_info's address: open addressing in one small array (a
// class's entry is one cache line; a hash map's bucket and node are two, apart).
struct TypeKinds {
  std::vector<TypeKind> slots = std::vector<TypeKind>(64);
  size_t used = 0;

  static size_t hash(const std::type_info* t) {
    return static_cast<size_t>((reinterpret_cast<uintptr_t>(t) >> 3) * 0x9E3779B97F4A7C15ull);
  }

  const TypeKind& of(Node* n) {
    const std::type_info* type = &typeid(*n);
    const size_t mask = slots.size() - 1;
    size_t i = hash(type) & mask;
    for (; slots[i].type != nullptr; i = (i + 1) & mask)
      if (slots[i].type == type) return slots[i];
    if (2 * (used + 1) > slots.size()) {  // (grow, then find the class's free slot again)
      std::vector<TypeKind> old(slots.size() * 2);
      old.swap(slots);
      for (const auto& k : old)
        if (k.type != nullptr) put(k);
    }
    ++used;
    return put(TypeKind{type, dynamic_cast<AccumulateGrad*>(n) != nullptr,
                        // (torch does not export PyNode's type_info)
                        std::strcmp(type->name(), "N5torch8autograd6PyNodeE") == 0,
                        type->hash_code()});
  }

  TypeKind& put(const TypeKind& k) {
    const size_t mask = slots.size() - 1;
    size_t i = hash(k.type) & mask;
    while (slots[i].type != nullptr) i = (i + 1) & mask;
    return slots[i] = k;
  }
};

uint64_t kind(Node* n, const Params& params, TypeKinds& types) {
  const TypeKind& k = types.of(n);
  if (k.accumulate) {  // a parameter: which one
    const c10::TensorImpl* p = static_cast<AccumulateGrad*>(n)->variable.unsafeGetTensorImpl();
    // (any other leaf, an input that requires grad, is new every step: all alike)
    return params.count(p) ? reinterpret_cast<uint64_t>(p) : NONE - 2;
  }
  if (k.py) {  // a custom autograd.Function: its class, from the node's Python object
    PyObject* obj = n->pyobj_slot()->load_pyobj();
    return obj ? reinterpret_cast<uint64_t>(Py_TYPE(obj)) : NONE - 1;
  }
  return k.hash;
}

// Node* -> its place in a walk: open addressing in one array kept from walk to walk, each
// walk's entries told apart by a generation number (no allocation per node, nor per walk:
// cold, on a step recorded 1 in N, a std::unordered_map's allocations cost microseconds).
struct Places {
  struct Slot {
    Node* node = nullptr;
    uint32_t gen = 0;
    uint32_t at = 0;
  };
  std::vector<Slot> slots = std::vector<Slot>(64);
  uint32_t gen = 0;
  size_t used = 0;

  void clear() {
    used = 0;
    if (++gen == 0) {  // (wrapped: every slot's generation is stale again)
      std::fill(slots.begin(), slots.end(), Slot{});
      gen = 1;
    }
  }

  static size_t hash(const Node* n) {
    return static_cast<size_t>((reinterpret_cast<uintptr_t>(n) >> 4) * 0x9E3779B97F4A7C15ull);
  }

  // (its place, whether it is new here: then at)
  std::pair<uint32_t, bool> place(Node* n, uint32_t at) {
    if (2 * (used + 1) > slots.size()) grow();
    const size_t mask = slots.size() - 1;
    for (size_t i = hash(n) & mask;; i = (i + 1) & mask) {
      Slot& s = slots[i];
      if (s.gen != gen) {
        s = Slot{n, gen, at};
        ++used;
        return {at, true};
      }
      if (s.node == n) return {s.at, false};
    }
  }

  void grow() {
    std::vector<Slot> old(slots.size() * 2);
    old.swap(slots);
    const size_t mask = slots.size() - 1;
    for (const Slot& s : old) {
      if (s.gen != gen) continue;
      size_t i = hash(s.node) & mask;
      while (slots[i].gen == gen) i = (i + 1) & mask;
      slots[i] = s;
    }
  }
};

// Breadth first from the outputs' nodes, as gradviz.dataflow.shape walks: the nodes in
// order (into order, cleared first), their shape appended to shape.
void walk(const std::vector<at::Tensor>& outs, const Params& params, TypeKinds& types,
          Places& at, std::vector<Node*>& order, std::vector<uint64_t>& shape) {
  order.clear();
  at.clear();
  auto place = [&](Node* n) -> uint64_t {
    auto [i, fresh] = at.place(n, static_cast<uint32_t>(order.size()));
    if (fresh) order.push_back(n);
    return i;
  };
  for (const auto& t : outs) {
    auto fn = t.grad_fn();
    shape.push_back(fn ? place(fn.get()) : NONE);
    shape.push_back(t.output_nr());
  }
  for (size_t i = 0; i < order.size(); ++i) {
    Node* n = order[i];
    shape.push_back(kind(n, params, types));
    shape.push_back(n->num_outputs());
    for (const auto& e : n->next_edges()) {
      shape.push_back(e.function ? place(e.function.get()) : NONE);
      shape.push_back(e.input_nr);
    }
  }
}

struct Recorder {
  std::shared_ptr<State> st = std::make_shared<State>();
  std::vector<Plan> plans;
  std::set<std::vector<uint64_t>> ambiguous;  // shapes seen with two plans: never armed
  std::vector<at::Tensor> params;  // each parameter once, in capture's _unique order
  Params param_set;
  TypeKinds types;  // (node classes seen in walks)
  Places places;    // (kept from walk to walk, as these two)
  std::vector<Node*> order;
  std::vector<uint64_t> shape;
  std::map<std::vector<int64_t>, int64_t> layouts;  // (present; -1; columns) -> number
  std::vector<std::vector<int64_t>> layout_keys;
  std::vector<float> row;  // the last step's values, for put()
  std::vector<int64_t> key;  // ... and its layout's key (kept: no allocation a step)
  int64_t armed = 0, missed = 0;
  Stats stats;
  // The root's forward hook (RootHook): what it saw this step, read by notes().
  int64_t calls = 0;         // passes armed
  // record(max_passes=): forward passes armed for one step, past which rec.step() was
  // forgotten (every pass's values were kept for it, without end); and capture's warning
  int64_t max_passes;
  std::string capped_warning;
  bool capped_warned = false;  // max_passes reached once (warned)
  bool pass_missed = false;  // a pass not armed
  std::string stop;          // why the recorder must leave native for good (kept)
  bool off = false;          // the Python recorder failed: the root hook does nothing
  py::object py_outputs;     // capture._grad_outputs, for an output that is not a tensor
  py::object py_config;      // capture._dynamo_config_compiled_autograd
  py::object capture_dict;   // gradviz.capture's globals (its _CA_ENTRY)
  struct {                   // the names compiled_autograd_on reads, made once
    py::str ca{"torch._dynamo.compiled_autograd"}, cfg{"torch._dynamo.config"},
        enabled{"compiled_autograd_enabled"}, region{"in_compiled_autograd_region"},
        entry{"_CA_ENTRY"};
  } names;

  Recorder(std::vector<at::Tensor> ps, int64_t max_passes_, std::string capped_warning_)
      : params(std::move(ps)),
        max_passes(max_passes_),
        capped_warning(std::move(capped_warning_)) {
    for (const auto& p : params) {
      param_set.insert(p.unsafeGetTensorImpl());
      if (p.requires_grad()) st->accs.push_back(torch::autograd::impl::grad_accumulator(p));
    }
  }

  // hooks: (sequence number of the node, outs, ins), as capture._Plan.hooks; False if a
  // planned node is not in the walk exactly once (the plan cannot be followed here).
  bool learn(const std::vector<at::Tensor>& outs,
             const std::vector<std::tuple<uint64_t, std::vector<std::pair<int64_t, int64_t>>,
                                          std::vector<std::tuple<int64_t, int64_t, int64_t>>>>& hooks,
             const std::vector<std::pair<int64_t, int64_t>>& groups) {
    Plan plan;
    walk(outs, param_set, types, places, order, plan.shape);
    if (ambiguous.count(plan.shape)) return false;
    std::unordered_map<uint64_t, int64_t> by_seq;
    for (size_t i = 0; i < order.size(); ++i) {
      auto seq = order[i]->sequence_nr();
      if (!by_seq.emplace(seq, static_cast<int64_t>(i)).second) by_seq[seq] = -1;
    }
    auto specs = std::make_shared<Plan::Hooks>();
    for (const auto& [seq, outs_, ins] : hooks) {
      auto it = by_seq.find(seq);
      if (it == by_seq.end() || it->second < 0) return false;
      for (const auto& [index, col, gi] : ins)
        if ((gi >= 0 ? gi : -2 - gi) >= static_cast<int64_t>(groups.size())) return false;
      specs->emplace_back(it->second, Spec{outs_, ins});
    }
    plan.hooks = std::move(specs);
    plan.groups = groups;
    for (auto& p : plans) {
      if (p.shape != plan.shape) continue;
      if (!p.ambiguous && p.same(plan)) return true;  // learnt already
      p.ambiguous = true;
      if (ambiguous.size() < 1024) ambiguous.insert(p.shape);
      return false;
    }
    if (plans.size() >= MAX_PLANS) plans.erase(plans.begin());
    plans.push_back(std::move(plan));
    return true;
  }

  // Hook this pass if its shape was learnt: 1; 0: it was not, -1: not on the CPU (nothing
  // is hooked then, but a hook that notes whether backward reaches the pass); 2: nothing to
  // hook, grad mode is off or the forward is re-run in backward (activation checkpointing).
  int arm(const std::vector<at::Tensor>& outs) {
    end();
    if (!recording_forward()) return 2;
    bool cpu = true;
    for (const auto& t : outs) cpu = cpu && t.is_cpu();
    shape.clear();
    walk(outs, param_set, types, places, order, shape);
    for (const auto& plan : plans) {
      if (plan.shape != shape) continue;
      if (plan.ambiguous || !cpu) break;
      auto pass = std::make_shared<Pass>(plan);
      st->passes.push_back(pass);
      for (const auto& [i, spec] : *plan.hooks)
        order[i]->add_post_hook(std::make_unique<Hook>(st, pass, &spec));
      ++armed;
      return 1;
    }
    ++missed;
    for (const auto& t : outs)
      if (t.grad_fn()) t.grad_fn()->add_post_hook(std::make_unique<MissHook>(st));
    return cpu ? 0 : -1;
  }

  // -- the root's forward hook (capture's forward hook for native steps, in C++) ---------

  // An attribute of obj, as truth (missing: false).
  static bool flag(PyObject* obj, const py::str& name) {
    PyObject* v = PyObject_GetAttr(obj, name.ptr());
    if (v == nullptr) {
      if (!PyErr_ExceptionMatches(PyExc_AttributeError)) throw py::error_already_set();
      PyErr_Clear();
      return false;
    }
    const int truth = PyObject_IsTrue(v);
    Py_DECREF(v);
    if (truth < 0) throw py::error_already_set();
    return truth == 1;
  }

  // sys.modules.get(name), as capture reads it, or None: no import. (Not PyImport_GetModule:
  // it also reads the module's __spec__._initializing, which cold costs ~4 us a module, a
  // tenth of the root hook's time.)
  static py::object loaded(const py::str& name) {
    PyObject* modules = PyImport_GetModuleDict();  // (borrowed)
    if (!PyDict_Check(modules)) {  // (a sys.modules replaced by a mapping that is no dict)
      PyObject* m = PyImport_GetModule(name.ptr());
      if (m == nullptr && PyErr_Occurred()) throw py::error_already_set();
      return m == nullptr ? py::none() : py::reinterpret_steal<py::object>(m);
    }
    PyObject* m = PyDict_GetItemWithError(modules, name.ptr());  // (borrowed)
    if (m == nullptr && PyErr_Occurred()) throw py::error_already_set();
    return m == nullptr ? py::none() : py::reinterpret_borrow<py::object>(m);
  }

  // capture._compiled_autograd_on: the module's flags, then torch._dynamo.config's
  // compiled_autograd through capture's cached entry (cfg, context variable or None,
  // unset marker, value); anything else, capture's own read (which caches the entry).
  bool compiled_autograd_on() {
    py::object ca = loaded(names.ca);
    if (ca.is_none()) return false;  // (never imported: never on)
    if (flag(ca.ptr(), names.enabled) || flag(ca.ptr(), names.region))
      return true;
    py::object cfg = loaded(names.cfg);
    if (cfg.is_none()) return false;
    PyObject* entry = PyDict_GetItem(capture_dict.ptr(), names.entry.ptr());  // (borrowed)
    if (entry == nullptr || !PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 4 ||
        PyTuple_GET_ITEM(entry, 0) != cfg.ptr())
      return py_config().cast<bool>();
    PyObject* user = PyTuple_GET_ITEM(entry, 1);
    if (user != Py_None) {
      if (!PyContextVar_CheckExact(user)) return py_config().cast<bool>();
      PyObject* v = nullptr;
      if (PyContextVar_Get(user, nullptr, &v) < 0) throw py::error_already_set();
      if (v != nullptr) {
        py::object value = py::reinterpret_steal<py::object>(v);
        if (v != PyTuple_GET_ITEM(entry, 2)) return py::bool_(value);
      }
    }
    return PyObject_IsTrue(PyTuple_GET_ITEM(entry, 3)) == 1;
  }

  // The root module's forward returned: hook the pass if its shape was learnt, else note
  // the miss (the step then gets parameter norms only). An error here is kept for take()
  // to raise, as a hook's: the user's forward goes on.
  void on_root(py::handle output) {
    if (off) return;
    try {
      std::vector<at::Tensor> outs;
      // (not output.grad_fn: a fresh node's Python object costs microseconds; the walk
      // reads the node in C++, and a tensor without one has nothing to hook)
      if (THPVariable_Check(output.ptr()))
        outs.push_back(THPVariable_Unpack(output.ptr()));
      else
        outs = py_outputs(output).cast<std::vector<at::Tensor>>();
      int got;
      if (recording_forward() && compiled_autograd_on()) {  // (its hooks: no compiled_args)
        end();
        stop = "compiled autograd is on";
        got = 0;
      } else if (calls >= max_passes) {  // (rec.step() forgotten)
        end();
        got = 2;
        if (!capped_warned && !capped_warning.empty()) {
          capped_warned = true;
          if (PyErr_WarnEx(PyExc_RuntimeWarning, capped_warning.c_str(), 1) < 0)
            PyErr_Clear();  // (warnings as errors: the user's forward goes on regardless)
        }
      } else if (recording_forward() && frozen()) {
        // (every parameter was trainable when it started: a layer without a trainable
        // parameter has no leaf in the walk, and two such layers of one type look alike)
        end();
        stop = "a parameter was frozen (requires_grad=False) during the run";
        got = 0;
      } else {
        got = arm(outs);  // (2: a pass under no_grad or re-run in backward: it has ended)
      }
      if (got == 1) {
        ++calls;
      } else if (got != 2) {
        if (got == -1) stop = "the model is no longer on the CPU";
        pass_missed = true;  // (a miss if the loss reached it: see notes)
      }
    } catch (py::error_already_set& e) {
      if (st->error.empty()) st->error = std::string("in forward: ") + e.what();
    } catch (const std::exception& e) {
      if (st->error.empty()) st->error = std::string("in forward: ") + e.what();
    }
  }

  bool frozen() const {
    for (const auto& p : params)
      if (!p.requires_grad()) return true;
    return false;
  }

  // What the root's hook saw this step, before take(): None when every pass was armed
  // (the usual step), else (passes armed, a pass not armed that backward reached or that
  // cannot be armed for good, why not for good or None).
  py::object notes() const {
    if (calls > 0 && !pass_missed) return py::none();
    const bool reached = pass_missed && (st->miss_reached || !stop.empty());
    return py::make_tuple(calls, reached, stop.empty() ? py::object(py::none()) : py::str(stop));
  }

  // -- forward statistics (see the top of this file) -------------------------------------

  // A layer's statistic columns (capture.LAYER_STATS); its slot number.
  int64_t add_layer(const std::array<int64_t, 5>& cols) {
    stats.layer_cols.push_back(cols);
    return static_cast<int64_t>(stats.layer_cols.size()) - 1;
  }

  // An activation module: kind 0 dead at zero, 1 saturated (lo, hi: bounds +- margin).
  int64_t add_activation(int kind, double lo, double hi) {
    stats.acts.push_back({kind, lo, hi});
    return static_cast<int64_t>(stats.acts.size()) - 1;
  }

  void unit_column(int64_t layer, int kind, int64_t col) { stats.unit_cols[{layer, kind}] = col; }

  // The root's forward returned (armed or not): this pass's statistics stand.
  void end() {
    stats.in_root = false;
    stats.made_by.clear();
  }

  // The root's forward begins: a pass that raised before it ended leaves no statistics.
  void begin() {
    if (stats.in_root) {
      stats.key.resize(stats.key_from);
      stats.vals.resize(stats.vals_from);
      stats.made_by.clear();
    }
    stats.in_root = true;
    stats.key_from = stats.key.size();
    stats.vals_from = stats.vals.size();
  }

  // A layer's forward hook: its outputs (those with an autograd node); statistics of the
  // first, and which layer made each's node.
  void stat(const std::vector<at::Tensor>& outs, int64_t slot) {
    if (outs.empty() || !recording_forward()) return;
    guard([&] {
      for (const auto& t : outs) {
        const auto& fn = t.grad_fn();
        if (fn)
          stats.made_by.insert_or_assign(fn.get(),
                                         std::make_pair(WeakNode(fn), slot));
      }
      const at::Tensor& t = outs[0];
      if (!t.grad_fn() || !t.is_floating_point() || t.numel() == 0 || !t.is_cpu()) return;
      at::Tensor x = floats(t);
      const auto v = x.scalar_type() == at::kFloat
                         ? layer_stats_of(x.const_data_ptr<float>(), x.numel())
                         : layer_stats_of(x.const_data_ptr<double>(), x.numel());
      const auto& cols = stats.layer_cols.at(static_cast<size_t>(slot));
      stats.key.push_back(5);
      stats.key.insert(stats.key.end(), cols.begin(), cols.end());
      stats.vals.insert(stats.vals.end(), v.begin(), v.end());
    });
  }

  // An activation module's forward hook: its unit statistic, credited to the layer whose
  // output it took. -1: done (or nothing to credit); else the layer slot that has no
  // column for this kind yet (the caller adds one with unit_column and calls again).
  int64_t unit(const at::Tensor& src, const at::Tensor& out, int64_t act) {
    if (!recording_forward()) return -1;
    int64_t need = -1;
    guard([&] {
      const Activation& a = stats.acts.at(static_cast<size_t>(act));
      NodeRef node = src.grad_fn();
      if (!node) return;
      auto it = stats.made_by.find(node.get());
      if (it == stats.made_by.end() && src.unsafeGetTensorImpl() == out.unsafeGetTensorImpl()) {
        // in place (ReLU(inplace=True)): the tensor's node is now the activation's own
        node = node->num_outputs() ? node->next_edge(0).function : NodeRef();
        if (!node) return;
        it = stats.made_by.find(node.get());
      }
      if (it == stats.made_by.end() || it->second.first.lock() != node || out.numel() == 0 ||
          !out.is_cpu() || !out.is_floating_point())
        return;
      const int64_t layer = it->second.second;
      auto col = stats.unit_cols.find({layer, a.kind});
      if (col == stats.unit_cols.end()) {
        need = layer;
        return;
      }
      at::Tensor x = floats(out);
      const double lo = in_dtype(a.lo, out.scalar_type()), hi = in_dtype(a.hi, out.scalar_type());
      float v;
      if (a.kind == 0) {
        const int64_t rows = x.dim() > 1 ? x.size(0) : 1, cols = x.numel() / rows;
        v = x.scalar_type() == at::kFloat ? dead_frac_of(x.const_data_ptr<float>(), rows, cols)
                                          : dead_frac_of(x.const_data_ptr<double>(), rows, cols);
      } else {
        v = x.scalar_type() == at::kFloat
                ? near_frac_of(x.const_data_ptr<float>(), x.numel(), lo, hi)
                : near_frac_of(x.const_data_ptr<double>(), x.numel(), lo, hi);
      }
      stats.key.push_back(1);
      stats.key.push_back(col->second);
      stats.vals.push_back(v);
    });
    return need;
  }

  // Never break the user's forward: a statistic's error is kept and raised by take().
  template <typename F>
  void guard(F&& f) {
    try {
      at::NoGradGuard no_grad;
      f();
    } catch (const std::exception& e) {
      if (st->error.empty()) st->error = std::string("in forward: ") + e.what();
    }
  }

  void forget_layouts() {
    layouts.clear();
    layout_keys.clear();
  }

  // End the step (record=false: drop it); the number of its layout, -1 when not recorded.
  // A hook's error (none should happen) is raised here, once: the recorder then stops.
  // loss: the step's loss as a tensor (its value ends the row), or None; one of several
  // values is refused first, with ValueError, before anything is taken: rec.step() then
  // takes the step without it (one check less in Python, cold).
  int64_t take(bool record, const c10::optional<at::Tensor>& loss) {
    TORCH_CHECK_VALUE(!loss.has_value() || !loss->defined() || loss->numel() == 1,
                      "a loss of ", loss.has_value() ? loss->numel() : 0, " values, not one");
    calls = 0;
    pass_missed = false;
    for (auto& pass : st->passes) pass->close(*st, record && st->error.empty());
    st->passes.clear();
    st->last.reset();
    st->miss_reached = false;
    if (!record || !st->error.empty()) {
      st->cols.clear();
      st->vals.clear();
      stats.clear();
      if (record) {
        std::string error = std::move(st->error);
        st->error.clear();
        throw std::runtime_error("the native recorder failed: " + error);
      }
      return -1;
    }
    key.clear();
    row.clear();
    for (size_t i = 0; i < params.size(); ++i) {
      const auto& g = params[i].grad();
      if (g.defined()) {
        key.push_back(static_cast<int64_t>(i));
        at::NoGradGuard no_grad;
        row.push_back(l2(g));
      }
    }
    key.push_back(-1);
    key.insert(key.end(), st->cols.begin(), st->cols.end());
    row.insert(row.end(), st->vals.begin(), st->vals.end());
    if (!stats.key.empty()) {  // (after the last column: -3, then count, columns... each)
      key.push_back(-3);
      key.insert(key.end(), stats.key.begin(), stats.key.end());
      row.insert(row.end(), stats.vals.begin(), stats.vals.end());
    }
    stats.clear();
    if (loss.has_value() && loss->defined()) {
      const at::Tensor& l = *loss;
      row.push_back(l.is_cpu() && l.scalar_type() == at::kFloat && !l.is_neg()
                        ? *l.const_data_ptr<float>()  // (item() dispatches: a microsecond)
                        : static_cast<float>(l.item<double>()));
      key.push_back(-2);  // (a layout of its own: the loss's column ends it)
    }
    st->cols.clear();
    st->vals.clear();
    auto it = layouts.find(key);
    if (it == layouts.end()) {
      it = layouts.emplace(key, static_cast<int64_t>(layouts.size())).first;
      layout_keys.push_back(it->first);
    }
    return it->second;
  }

  // take(true, loss), and when the step's layout is number want (that of the caller's
  // buffer, with room: the usual step) its row into row at of buf, as put(): one call.
  int64_t take_into(const c10::optional<at::Tensor>& loss, const c10::optional<at::Tensor>& buf,
                    int64_t at, int64_t want) {
    const int64_t lid = take(true, loss);
    if (lid == want && buf.has_value()) put(*buf, at);
    return lid;
  }

  // The step's values into row ``at`` of buf (the caller's float32 host buffer).
  void put(const at::Tensor& buf, int64_t at) {
    TORCH_CHECK(buf.is_cpu() && buf.scalar_type() == at::kFloat && buf.is_contiguous() &&
                    buf.dim() == 2 && at >= 0 && at < buf.size(0) &&
                    buf.size(1) == static_cast<int64_t>(row.size()),
                "gradviz native: no row ", at, " of ", row.size(), " values in ", buf.sizes());
    std::copy(row.begin(), row.end(), buf.data_ptr<float>() + at * buf.size(1));
  }

  // A layout's (parameters present, columns in order of arrival, statistics' columns).
  std::tuple<std::vector<int64_t>, std::vector<int64_t>, std::vector<std::vector<int64_t>>>
  layout(int64_t id) const {
    TORCH_CHECK(id >= 0 && static_cast<size_t>(id) < layout_keys.size(), "no layout ", id);
    const auto& key = layout_keys[id];
    auto sep = std::find(key.begin(), key.end(), -1);
    auto end = key.back() == -2 ? key.end() - 1 : key.end();
    auto stat = std::find(sep + 1, end, -3);
    std::vector<std::vector<int64_t>> groups;
    for (auto it = stat == end ? end : stat + 1; it < end; it += 1 + *it)
      groups.emplace_back(it + 1, it + 1 + *it);
    return {std::vector<int64_t>(key.begin(), sep), std::vector<int64_t>(sep + 1, stat),
            std::move(groups)};
  }

};

// The root module's forward hook on native steps, registered in its _forward_hooks as is
// (a Python function around it costs microseconds, cold, once in every=N steps). A copy of
// the model (copy.deepcopy, torch.save) gets capture._Inert instead, as for capture._Hook.
// It also carries the recorded step's two calls from rec.step(), notes() and take_into().
// A bare CPython type, not a pybind11 class: pybind11's dispatch of a call (overloads,
// argument casters, the type's registry) cold cost 7-14 us more than a no-op Python hook,
// more than the hook's own work; these are plain C calls.
struct RootHook {
  PyObject_HEAD
  std::shared_ptr<Recorder>* rec;  // (owned; null only if made from Python, which it is not)
};

py::object inert() { return py::module_::import("gradviz.capture").attr("_Inert"); }

// Its recorder, or null with a TypeError set (a RootHook is only made by root_hook)
Recorder* recorder_of(PyObject* self) {
  auto* rec = reinterpret_cast<RootHook*>(self)->rec;
  if (rec == nullptr) PyErr_SetString(PyExc_TypeError, "a RootHook without a recorder");
  return rec == nullptr ? nullptr : rec->get();
}

// hook(module, args, output), as nn.Module calls a forward hook registered without kwargs
PyObject* root_hook_call(PyObject* self, PyObject* args, PyObject* kwargs) {
  Recorder* rec = recorder_of(self);
  if (rec == nullptr) return nullptr;
  if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) != 3 ||
      (kwargs != nullptr && PyDict_GET_SIZE(kwargs) != 0)) {
    PyErr_SetString(PyExc_TypeError, "gradviz's root hook takes (module, args, output)");
    return nullptr;
  }
  rec->on_root(py::handle(PyTuple_GET_ITEM(args, 2)));  // (keeps its own errors)
  Py_RETURN_NONE;
}

void root_hook_dealloc(PyObject* self) {
  auto* h = reinterpret_cast<RootHook*>(self);
  delete h->rec;
  PyTypeObject* type = Py_TYPE(self);
  type->tp_free(self);
  Py_DECREF(type);  // (an instance of a heap type holds a reference to it)
}

PyObject* root_hook_copy(PyObject*, PyObject*) {  // __deepcopy__(memo): an inert hook
  HANDLE_TH_ERRORS
  return inert()().release().ptr();
  END_HANDLE_TH_ERRORS
}

PyObject* root_hook_reduce(PyObject*, PyObject*) {  // pickled: an inert hook
  HANDLE_TH_ERRORS
  return py::make_tuple(inert(), py::tuple()).release().ptr();
  END_HANDLE_TH_ERRORS
}

// notes(): Recorder.notes
PyObject* root_hook_notes(PyObject* self, PyObject*) {
  HANDLE_TH_ERRORS
  Recorder* rec = recorder_of(self);
  return rec == nullptr ? nullptr : rec->notes().release().ptr();
  END_HANDLE_TH_ERRORS
}

// take_into(loss, buf, at, want): Recorder.take_into (loss and buf: a tensor or None)
PyObject* root_hook_take_into(PyObject* self, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  Recorder* rec = recorder_of(self);
  if (rec == nullptr) return nullptr;
  const auto tensor = [](PyObject* o, c10::optional<at::Tensor>& out) {
    if (o == Py_None) return true;
    if (!THPVariable_Check(o)) return false;
    out = THPVariable_Unpack(o);
    return true;
  };
  c10::optional<at::Tensor> loss, buf;
  if (n != 4 || !tensor(args[0], loss) || !tensor(args[1], buf) || !PyLong_Check(args[2]) ||
      !PyLong_Check(args[3])) {
    PyErr_SetString(PyExc_TypeError, "take_into(loss, buf, at, want): tensors or None, ints");
    return nullptr;
  }
  const long long row = PyLong_AsLongLong(args[2]), want = PyLong_AsLongLong(args[3]);
  if (PyErr_Occurred()) return nullptr;  // (too large for 64 bits)
  return PyLong_FromLongLong(rec->take_into(loss, buf, row, want));
  END_HANDLE_TH_ERRORS
}

PyMethodDef root_hook_methods[] = {
    {"notes", root_hook_notes, METH_NOARGS, "Recorder.notes, as a plain C call"},
    {"take_into", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(root_hook_take_into)),
     METH_FASTCALL, "Recorder.take_into, as a plain C call"},
    {"__deepcopy__", root_hook_copy, METH_O, "a copy of the model gets an inert hook"},
    {"__reduce__", root_hook_reduce, METH_NOARGS, "a pickled model gets an inert hook"},
    {nullptr, nullptr, 0, nullptr}};

PyType_Slot root_hook_slots[] = {
    {Py_tp_call, reinterpret_cast<void*>(root_hook_call)},
    {Py_tp_dealloc, reinterpret_cast<void*>(root_hook_dealloc)},
    {Py_tp_methods, root_hook_methods},
    {Py_tp_doc, const_cast<char*>("gradviz's forward hook on the root module (native steps)")},
    {0, nullptr}};

PyType_Spec root_hook_spec = {
    "gradviz_native.RootHook", sizeof(RootHook), 0,
#ifdef Py_TPFLAGS_DISALLOW_INSTANTIATION
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
#else
    Py_TPFLAGS_DEFAULT,
#endif
    root_hook_slots};

PyTypeObject* root_hook_type = nullptr;  // (made when the module loads)

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("norm", [](const at::Tensor& t) { return l2(t); }, "an L2 norm as the hooks take it");
  root_hook_type = reinterpret_cast<PyTypeObject*>(PyType_FromSpec(&root_hook_spec));
  if (root_hook_type == nullptr) throw py::error_already_set();
  m.add_object("RootHook", py::handle(reinterpret_cast<PyObject*>(root_hook_type)));
  py::class_<Recorder, std::shared_ptr<Recorder>>(m, "Recorder")
      .def(py::init<std::vector<at::Tensor>, int64_t, std::string>(), py::arg("params"),
           py::arg("max_passes") = 1024, py::arg("capped_warning") = std::string())
      .def("root_hook",
           [](std::shared_ptr<Recorder> r, py::object outputs, py::object config,
              py::object globals) {
             r->py_outputs = std::move(outputs);
             r->py_config = std::move(config);
             r->capture_dict = std::move(globals);
             PyObject* o = root_hook_type->tp_alloc(root_hook_type, 0);
             if (o == nullptr) throw py::error_already_set();
             reinterpret_cast<RootHook*>(o)->rec = new std::shared_ptr<Recorder>(std::move(r));
             return py::reinterpret_steal<py::object>(o);
           },
           "the root's forward hook, given capture's _grad_outputs, its compiled-autograd "
           "config read, and its globals")
      .def("compiled_autograd_on", &Recorder::compiled_autograd_on,
           "as capture._compiled_autograd_on (after root_hook)")
      .def_readwrite("off", &Recorder::off)
      .def("learn", &Recorder::learn)
      .def("arm", &Recorder::arm)
      .def("take", &Recorder::take)
      .def("put", &Recorder::put)
      .def("layout", &Recorder::layout)
      .def("forget_layouts", &Recorder::forget_layouts)
      .def("add_layer", &Recorder::add_layer)
      .def("add_activation", &Recorder::add_activation)
      .def("unit_column", &Recorder::unit_column)
      .def("begin", &Recorder::begin)
      .def("stat", &Recorder::stat)
      .def("stat_one", [](Recorder& r, const at::Tensor& t, int64_t slot) {
        r.stat({t}, slot);
      })
      .def("unit", &Recorder::unit)
      .def_readonly("armed", &Recorder::armed)
      .def_readonly("missed", &Recorder::missed)
      .def_property_readonly("plans", [](const Recorder& r) { return r.plans.size(); });
}
