// The "C++ floor" of benchmarks/floor.py: the cheapest recorder of a chain model's
// numbers that the benchmark could write. Not part of gradviz: it measures what a
// hook-based recorder cannot go below, with no Python at all in backward or in the step.
//
// arm(output): walk the autograd graph from the model's output (the same order as
// floor.py's Python walk) and, if it has the shape learnt first, put a C++ post-hook on
// each layer's node. The hook takes the norms of dL/d(output) and of the gradient into
// the layer's data input (the edge from the layer before) at once, while they are in
// cache, and keeps only the numbers. take(params, loss, row) adds the parameter
// gradients' norms and the loss, written straight into a float32 row of the caller's.
// How each norm is taken (Floor(mode)): TORCH, torch's own op (at::linalg_vector_norm);
// LOOP, a plain loop over the floats (torch's op costs about 1 us a call in dispatch,
// allocation and .item() before any arithmetic); NONE, 0 for every norm: the same walk,
// hooks and row without the arithmetic.
#include <torch/extension.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>

#include <cmath>
#include <memory>
#include <unordered_set>
#include <vector>

using torch::autograd::FunctionPostHook;
using torch::autograd::Node;
using torch::autograd::variable_list;

namespace {

enum Mode { TORCH = 0, LOOP = 1, NONE = 2 };

float l2(const at::Tensor& t) {
  return at::linalg_vector_norm(t, 2, c10::nullopt, false, at::kFloat).item<float>();
}

// The same norm with no dispatch: squares summed in 16 float lanes over blocks of 1024
// (which the compiler vectorises), the blocks' sums in double. Within about 1e-7 of the
// exact (float64) norm; l2, torch's float32 kernel, is off by up to about 1e-4 on 4M values.
float loop_l2(const at::Tensor& t) {
  if (!(t.is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous())) return l2(t);
  const float* p = t.data_ptr<float>();
  const int64_t n = t.numel();
  int64_t i = 0;
  double total = 0;
  for (; i + 1024 <= n; i += 1024) {
    float lane[16] = {0};
    for (int64_t j = i; j < i + 1024; j += 16)
      for (int k = 0; k < 16; ++k) lane[k] += p[j + k] * p[j + k];
    float block = 0;
    for (float v : lane) block += v;
    total += block;
  }
  for (; i < n; ++i) total += static_cast<double>(p[i]) * p[i];
  return static_cast<float>(std::sqrt(total));
}

struct Values {
  std::vector<float> norms;  // this step's, in the order the hooks ran
  Mode mode = TORCH;
};

float value(const Values& v, const at::Tensor& t) {
  return v.mode == NONE ? 0.0f : v.mode == LOOP ? loop_l2(t) : l2(t);
}

struct LayerHook : FunctionPostHook {
  std::shared_ptr<Values> values;
  int64_t port;  // the data input's index in grad_inputs, -1: none (the first layer)
  LayerHook(std::shared_ptr<Values> v, int64_t p) : values(std::move(v)), port(p) {}
  variable_list operator()(const variable_list& grad_inputs,
                           const variable_list& grad_outputs) override {
    if (!grad_outputs.empty() && grad_outputs[0].defined())
      values->norms.push_back(value(*values, grad_outputs[0]));
    if (port >= 0 && static_cast<size_t>(port) < grad_inputs.size() &&
        grad_inputs[port].defined())
      values->norms.push_back(value(*values, grad_inputs[port]));
    return grad_inputs;
  }
};

struct Floor {
  std::shared_ptr<Values> values = std::make_shared<Values>();
  explicit Floor(int64_t mode) {
    TORCH_CHECK(mode >= TORCH && mode <= NONE, "mode ", mode, ": 0 torch, 1 loop, 2 none");
    values->mode = static_cast<Mode>(mode);
  }
  std::vector<uint64_t> shape;                         // the walk learnt first
  std::vector<std::pair<int64_t, int64_t>> layers;     // (place in the walk, port)
  int64_t missed = 0;                                  // passes of another shape

  static std::vector<Node*> walk(const at::Tensor& out, std::vector<uint64_t>& shape) {
    std::vector<Node*> order;
    auto root = out.grad_fn();
    if (!root) return order;
    std::vector<Node*> stack{root.get()};
    std::unordered_set<Node*> seen{root.get()};
    while (!stack.empty()) {
      Node* n = stack.back();
      stack.pop_back();
      order.push_back(n);
      shape.push_back(typeid(*n).hash_code());
      for (const auto& e : n->next_edges()) {
        shape.push_back(e.function ? e.input_nr : UINT64_MAX);
        if (e.function && seen.insert(e.function.get()).second) stack.push_back(e.function.get());
      }
    }
    return order;
  }

  void learn(const at::Tensor& out, std::vector<std::pair<int64_t, int64_t>> at) {
    shape.clear();
    auto order = walk(out, shape);
    for (const auto& [i, port] : at)
      TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(order.size()),
                  "node ", i, " of the plan is not in a walk of ", order.size());
    layers = std::move(at);
  }

  bool arm(const at::Tensor& out) {
    std::vector<uint64_t> s;
    s.reserve(shape.size());
    auto order = walk(out, s);
    if (s != shape) {
      ++missed;
      return false;
    }
    for (const auto& [i, port] : layers)
      order[i]->add_post_hook(std::make_unique<LayerHook>(values, port));
    return true;
  }

  int64_t take(const std::vector<at::Tensor>& params, const at::Tensor& loss, at::Tensor row) {
    TORCH_CHECK(row.is_contiguous() && row.scalar_type() == at::kFloat && row.is_cpu());
    float* r = row.data_ptr<float>();
    int64_t k = 0, cap = row.numel();
    auto put = [&](float v) { if (k < cap) r[k] = v; ++k; };
    for (const auto& p : params) {
      const auto& g = p.grad();
      if (g.defined()) put(value(*values, g));
    }
    for (float v : values->norms) put(v);
    values->norms.clear();
    put(loss.item<float>());
    return k;
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("norm", [](const at::Tensor& t, int64_t mode) {  // one norm as a floor takes it
    Values v;
    v.mode = static_cast<Mode>(mode);
    return value(v, t);
  });
  py::class_<Floor>(m, "Floor")
      .def(py::init<int64_t>())
      .def("learn", &Floor::learn)
      .def("arm", &Floor::arm)
      .def("take", &Floor::take)
      .def_readonly("missed", &Floor::missed);
}
