// The fast path's graph walk, nn.Linear match and per-task hooks in C++ (see
// lossbalance/_taps.py, whose Python Capture does the same work, and lossbalance/_native).
//
// Per step: walk() finds, from each loss, the autograd nodes that read the tapped h (the
// same walk and the same problems as lossbalance._graph.consumers_of); match_linear() finds
// h = act(x W^T + b) below it as lossbalance._taps.linear_pattern does; begin_h() or
// begin_linear() registers one C++ post-hook on each reading node; during the one backward
// a hook sees g_i = w_i dL_i/dh and either writes ||g_i|| into row i of a kept [T] tensor
// ("h") or writes delta_i = g_i * act'(z) into a chunk buffer, and every `chunk` tasks (and
// at the last task) one batched matmul forms dW_i = delta_i^T x and their norms ("linear");
// finish() returns the norms in task order, or the tasks whose gradient was not seen.
// A Python hook costs a call into the interpreter per task; these cost none.

#include <torch/python.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/generated/Functions.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace py = pybind11;
using torch::autograd::Edge;
using torch::autograd::FunctionPostHook;
using torch::autograd::Node;
using torch::autograd::variable_list;

namespace {

struct Step {
  std::mutex lock;
  uint64_t generation = 0;  // hooks of another step do nothing
  bool active = false;
  bool linear = false;
  at::Tensor h, out, delta_rows, x, dw, relu_out, jac;
  std::vector<at::Tensor> rows, slots;
  c10::optional<at::ScalarType> norm_dtype;
  int64_t chunk = 1, pos = 0;
  std::vector<int64_t> filled, order, remaining;
  std::vector<char> done;
  std::unordered_map<int64_t, at::Tensor> partial;

  void take(int64_t i, const at::Tensor& g) {
    if (!linear) {
      if (!loop_norm(g, i)) {
        if (rows.empty()) rows = out.unbind(0);
        at::linalg_vector_norm_out(rows[i], g, 2, c10::nullopt, false, norm_dtype);
      }
      done[i] = 1;
      return;
    }
    at::Tensor& slot = slots[filled.size()];
    if (!loop_delta(g, slot)) {
      if (relu_out.defined()) {
        at::threshold_backward_out(slot, g, relu_out, 0);
      } else if (jac.defined()) {
        at::mul_out(slot, g, jac);
      } else {
        slot.copy_(g);
      }
    }
    filled.push_back(i);
    // a full chunk, or the last task: flush now, while delta is still in the cache
    const int64_t n = static_cast<int64_t>(filled.size());
    if (n == chunk || pos + n == static_cast<int64_t>(done.size())) flush();
  }

  // On the CPU, for contiguous float32/float64 tensors, a task's norm at h and its delta_i
  // at W are plain loops: an ATen operation costs a few microseconds of dispatch for ~1-2 us
  // of work here, per task and per step (the loops, vectorised by the compiler, take 1.4 us
  // for a [128, 100] mask and 1.8 us for its norm, against ATen's 1.8 us and 2.2 us with
  // warm caches). The norm sums squares in double precision (eight partial sums), so it
  // can differ from ATen's float reduction in the last bits; delta_i is element for element
  // what threshold_backward, mul or copy_ write. Anything else takes ATen's operations.
  template <typename scalar_t>
  static double sum_of_squares(const scalar_t* g, int64_t n) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      for (int k = 0; k < 8; ++k) {
        const double v = static_cast<double>(g[j + k]);
        acc[k] += v * v;
      }
    }
    for (; j < n; ++j) acc[0] += static_cast<double>(g[j]) * static_cast<double>(g[j]);
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  }

  static bool plain_cpu(const at::Tensor& t, at::ScalarType dtype) {
    return t.defined() && t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous();
  }

  bool loop_norm(const at::Tensor& g, int64_t i) {
    const at::ScalarType dtype = g.scalar_type();
    if (!(dtype == at::kFloat || dtype == at::kDouble) || !plain_cpu(g, dtype) ||
        !plain_cpu(out, *norm_dtype) || *norm_dtype != dtype) {
      return false;
    }
    if (dtype == at::kFloat) {
      out.data_ptr<float>()[i] =
          static_cast<float>(std::sqrt(sum_of_squares(g.const_data_ptr<float>(), g.numel())));
    } else {
      out.data_ptr<double>()[i] = std::sqrt(sum_of_squares(g.const_data_ptr<double>(), g.numel()));
    }
    return true;
  }

  bool loop_delta(const at::Tensor& g, at::Tensor& slot) {
    const at::ScalarType dtype = g.scalar_type();
    if (!(dtype == at::kFloat || dtype == at::kDouble) || !plain_cpu(g, dtype) ||
        !plain_cpu(slot, dtype) || g.numel() != slot.numel() ||
        (relu_out.defined() && !plain_cpu(relu_out, dtype)) ||
        (!relu_out.defined() && jac.defined() && !plain_cpu(jac, dtype))) {
      return false;
    }
    AT_DISPATCH_FLOATING_TYPES(dtype, "delta", [&] {
      const scalar_t* __restrict__ src = g.const_data_ptr<scalar_t>();
      scalar_t* __restrict__ dst = slot.data_ptr<scalar_t>();
      const int64_t n = g.numel();
      if (relu_out.defined()) {  // act'(z) = [h > 0], as threshold_backward(g, h, 0)
        const scalar_t* __restrict__ r = relu_out.const_data_ptr<scalar_t>();
        for (int64_t j = 0; j < n; ++j) {
          const scalar_t v = src[j];  // loaded unconditionally, so the loop vectorises
          dst[j] = r[j] <= scalar_t(0) ? scalar_t(0) : v;
        }
      } else if (jac.defined()) {
        const scalar_t* __restrict__ d = jac.const_data_ptr<scalar_t>();
        for (int64_t j = 0; j < n; ++j) dst[j] = src[j] * d[j];
      } else {
        std::copy(src, src + n, dst);
      }
    });
    return true;
  }

  void flush() {
    const int64_t n = static_cast<int64_t>(filled.size());
    if (n == 0) return;
    at::Tensor delta = n == chunk ? delta_rows : delta_rows.slice(0, 0, n);
    at::Tensor part = out.slice(0, pos, pos + n);
    at::Tensor dwn = n == chunk ? dw : dw.slice(0, 0, n);
    at::matmul_out(dwn, delta.transpose(1, 2), x);  // dW_i = delta_i^T x
    at::linalg_vector_norm_out(part, dwn.view({n, -1}), 2, at::IntArrayRef{1}, false,
                               norm_dtype);
    pos += n;
    for (int64_t i : filled) {
      order.push_back(i);
      done[i] = 1;
    }
    filled.clear();
  }
};

struct TaskHook : FunctionPostHook {
  std::shared_ptr<Step> step;
  uint64_t generation;
  int64_t task, input;
  bool single;

  TaskHook(std::shared_ptr<Step> s, uint64_t gen, int64_t i, int64_t k, bool one)
      : step(std::move(s)), generation(gen), task(i), input(k), single(one) {}

  variable_list operator()(const variable_list& grad_inputs,
                           const variable_list& /*grad_outputs*/) override {
    Step& s = *step;
    std::lock_guard<std::mutex> guard(s.lock);
    if (!s.active || s.generation != generation) return grad_inputs;
    at::NoGradGuard no_grad;
    at::Tensor g = grad_inputs[input];
    if (!g.defined()) g = at::zeros_like(s.h);
    if (!single) {  // a head that reads h in several places: sum them first
      s.remaining[task] -= 1;
      auto it = s.partial.find(task);
      if (it == s.partial.end()) {
        s.partial.emplace(task, g);
      } else {
        it->second = it->second + g;
      }
      if (s.remaining[task] > 0) return grad_inputs;
      g = s.partial[task];
      s.partial.erase(task);
    }
    s.take(task, g);
    return grad_inputs;
  }
};

// the pointer type autograd holds nodes by (an intrusive or a shared pointer by version)
using NodePtr = std::decay_t<decltype(std::declval<Node&>().getptr())>;
// Element-wise activations whose Jacobian is diagonal (lossbalance._taps._ELEMENTWISE).
bool is_elementwise(const std::string& name) {
  static const std::unordered_set<std::string> names = {
      "ReluBackward0", "LeakyReluBackward0", "TanhBackward0",     "SigmoidBackward0",
      "GeluBackward0", "EluBackward0",       "SiluBackward0",     "SoftplusBackward0",
      "HardtanhBackward0"};
  return names.count(name) > 0;
}

// The gradient edges (node, input number) of the shared tensors (lossbalance._graph.edges_of).
std::vector<std::pair<const Node*, uint32_t>> edges_of(const std::vector<at::Tensor>& shared) {
  std::vector<std::pair<const Node*, uint32_t>> edges;
  for (const auto& t : shared) {
    const Edge e = torch::autograd::impl::gradient_edge(t);
    edges.emplace_back(e.function.get(), e.input_nr);
  }
  return edges;
}

// Whether a walk from `start` reaches the gradient edge of a tensor of `shared`
// (lossbalance._graph.reached_from with first=True).
bool reaches(Node* start, const std::vector<at::Tensor>& shared) {
  if (start == nullptr) return false;
  const auto targets = edges_of(shared);
  std::unordered_set<const Node*> seen{start};
  std::vector<Node*> stack{start};
  while (!stack.empty()) {
    Node* n = stack.back();
    stack.pop_back();
    for (const auto& e : n->next_edges()) {
      Node* next = e.function.get();
      if (next == nullptr) continue;
      for (const auto& target : targets) {
        if (target.first == next && target.second == e.input_nr) return true;
      }
      if (seen.insert(next).second) stack.push_back(next);
    }
  }
  return false;
}

// Where gradients from `loss` enter the graph (lossbalance._graph._start_node): a loss taken
// out of torch.stack(losses) along dim 0 (unbind or select) starts at that stack's input.
Node* start_node(const at::Tensor& loss) {
  using torch::autograd::generated::SelectBackward0;
  using torch::autograd::generated::StackBackward0;
  using torch::autograd::generated::UnbindBackward0;
  Node* node = loss.grad_fn().get();
  if (node == nullptr) return nullptr;
  int64_t index = 0;
  if (auto* unbind = dynamic_cast<UnbindBackward0*>(node)) {
    if (unbind->dim != 0) return node;
    index = loss.output_nr();
  } else if (auto* select = dynamic_cast<SelectBackward0*>(node)) {
    if (select->dim != 0 || select->index.is_heap_allocated()) return node;  // symbolic
    index = select->index.as_int_unchecked();
  } else {
    return node;
  }
  Node* src = node->next_edges()[0].function.get();
  auto* stack = dynamic_cast<StackBackward0*>(src);
  if (stack == nullptr || stack->dim != 0) return node;
  if (index < 0 || index >= static_cast<int64_t>(src->next_edges().size())) return node;
  return src->next_edges()[index].function.get();
}

using Consumers = std::vector<std::vector<std::pair<NodePtr, int64_t>>>;

class NativeCapture {
 public:
  NativeCapture() : step_(std::make_shared<Step>()) {}

  // The nodes of each loss that read h, as lossbalance._graph.consumers_of finds them.
  // Returns None, ("unreached", i), ("shared", j, i) or ("bypass", i, k).
  py::object walk(const std::vector<at::Tensor>& losses, const at::Tensor& h,
                  const std::vector<at::Tensor>& shared) {
    consumers_.clear();
    const Edge h_edge = torch::autograd::impl::gradient_edge(h);
    const Node* h_node = h_edge.function.get();
    const uint32_t h_nr = h_edge.input_nr;
    const auto avoid = edges_of(shared);
    std::unordered_map<const Node*, int64_t> owner;
    std::unordered_set<const Node*> seen;
    std::vector<Node*> stack;
    for (int64_t i = 0; i < static_cast<int64_t>(losses.size()); ++i) {
      Node* start = start_node(losses[i]);
      if (start == nullptr) return py::make_tuple("unreached", i);
      std::vector<std::pair<NodePtr, int64_t>> found;
      seen.clear();
      seen.insert(start);
      stack.assign(1, start);
      int64_t bypass = -1;
      while (!stack.empty()) {
        Node* node = stack.back();
        stack.pop_back();
        const auto& edges = node->next_edges();
        for (size_t k = 0; k < edges.size(); ++k) {
          Node* next = edges[k].function.get();
          if (next == h_node) {
            if (edges[k].input_nr == h_nr) {
              found.emplace_back(node->getptr(), static_cast<int64_t>(k));
            }
          } else if (next != nullptr) {
            if (bypass < 0) {
              for (size_t a = 0; a < avoid.size(); ++a) {
                if (avoid[a].first == next && avoid[a].second == edges[k].input_nr) {
                  bypass = static_cast<int64_t>(a);
                  break;
                }
              }
            }
            if (!next->next_edges().empty() && seen.insert(next).second) stack.push_back(next);
          }
        }
      }
      if (found.empty()) return py::make_tuple("unreached", i);
      if (bypass >= 0) return py::make_tuple("bypass", i, bypass);
      for (const auto& f : found) {
        auto ins = owner.emplace(f.first.get(), i);
        if (ins.first->second != i) return py::make_tuple("shared", ins.first->second, i);
      }
      consumers_.push_back(std::move(found));
    }
    return py::none();
  }

  int64_t num_consumers() const { return static_cast<int64_t>(consumers_.size()); }

  // Norms at h: ||g_i|| into out[i].
  void begin_h(const at::Tensor& h, const at::Tensor& out, at::ScalarType norm_dtype) {
    Step& s = reset(h, out, norm_dtype);
    s.linear = false;
    s.rows.clear();  // made when a hook needs them (see take)
    hook();
  }

  // Norms at an nn.Linear weight W upstream of h = act(x W^T + b): see Step::flush.
  // `delta` is the kept [chunk, *h.shape] buffer; its rows and its [chunk, rows, out]
  // view are made again only when it changes.
  void begin_linear(const at::Tensor& h, const at::Tensor& out, at::ScalarType norm_dtype,
                    const at::Tensor& delta, const at::Tensor& x, const at::Tensor& dw,
                    const c10::optional<at::Tensor>& relu_out,
                    const c10::optional<at::Tensor>& jac) {
    Step& s = reset(h, out, norm_dtype);
    s.linear = true;
    if (!delta_.defined() || !delta_.is_same(delta) || delta_rows_.size(1) != x.size(0)) {
      delta_ = delta;
      slots_ = delta.unbind(0);
      delta_rows_ = delta.view({delta.size(0), x.size(0), h.size(-1)});
    }
    s.delta_rows = delta_rows_;
    s.slots = slots_;
    s.chunk = static_cast<int64_t>(s.slots.size());
    s.x = x;
    s.dw = dw;
    s.relu_out = relu_out.has_value() ? *relu_out : at::Tensor();
    s.jac = jac.has_value() ? *jac : at::Tensor();
    hook();
  }

  // Flushes the last chunk. Returns the norms G_i in task order (a new tensor), or, when a
  // task's gradient was not seen, the list of those tasks (the caller raises).
  py::object finish() {
    Step& s = *step_;
    std::lock_guard<std::mutex> guard(s.lock);
    if (s.linear) {
      at::NoGradGuard no_grad;
      s.flush();
    }
    std::vector<int64_t> missing;
    for (int64_t i = 0; i < static_cast<int64_t>(s.done.size()); ++i) {
      if (!s.done[i]) missing.push_back(i);
    }
    if (!missing.empty()) return py::cast(missing);
    if (!s.linear) return py::cast(s.out.clone());
    // the chunks' norms sit in fill order: norms[order[j]] = out[j]
    const int64_t n = static_cast<int64_t>(s.order.size());
    if (!s.out.device().is_cpu()) {
      std::vector<int64_t> inverse(n);
      for (int64_t j = 0; j < n; ++j) inverse[s.order[j]] = j;
      at::Tensor index = at::tensor(inverse, at::TensorOptions().dtype(at::kLong));
      return py::cast(s.out.index_select(0, index.to(s.out.device())));
    }
    at::Tensor norms = at::empty_like(s.out);
    AT_DISPATCH_FLOATING_TYPES(s.out.scalar_type(), "finish", [&] {
      const scalar_t* src = s.out.const_data_ptr<scalar_t>();
      scalar_t* dst = norms.data_ptr<scalar_t>();
      for (int64_t j = 0; j < n; ++j) dst[s.order[j]] = src[j];
    });
    return py::cast(norms);
  }

  // lossbalance._taps.linear_pattern in C++: h = act_k(...act_1(x @ W.T + b)), or that
  // matmul's [B*L, out] result viewed as [B, L, out], with every shared tensor W or b and
  // neither used below the layer. Returns None, or (x, roles, relu_out, jac): the layer's
  // input, "weight"/"bias" per shared tensor, and act'(z) as ReLU's saved output (one ReLU)
  // or as the activation chain's VJP of ones (other element-wise activations), else None.
  py::object match_linear(const at::Tensor& h, const std::vector<at::Tensor>& shared) {
    if (h.dim() < 2 || shared.empty()) return py::none();
    Node* node = h.grad_fn().get();
    std::vector<Node*> acts;
    while (node != nullptr && is_elementwise(node->name())) {
      acts.push_back(node);
      node = node->next_edges()[0].function.get();
    }
    if (node != nullptr &&
        (node->name() == "ViewBackward0" || node->name() == "UnsafeViewBackward0")) {
      node = node->next_edges()[0].function.get();
    } else if (h.dim() != 2) {
      return py::none();
    }
    if (node == nullptr) return py::none();
    using torch::autograd::generated::AddmmBackward0;
    using torch::autograd::generated::MmBackward0;
    Node* bias_acc = nullptr;
    Node* t_node = nullptr;
    at::Tensor x;
    int64_t x_input = 0;
    if (auto* addmm = dynamic_cast<AddmmBackward0*>(node)) {
      if (!(addmm->alpha.equal(1) && addmm->beta.equal(1))) return py::none();
      bias_acc = node->next_edges()[0].function.get();
      t_node = node->next_edges()[2].function.get();
      x = addmm->mat1_.unpack();
      x_input = 1;
    } else if (auto* mm = dynamic_cast<MmBackward0*>(node)) {
      t_node = node->next_edges()[1].function.get();
      x = mm->self_.unpack();
    } else {
      return py::none();
    }
    if (t_node == nullptr || t_node->name() != "TBackward0") return py::none();
    Node* weight_acc = t_node->next_edges()[0].function.get();
    std::vector<std::string> roles;
    for (const auto& t : shared) {
      const Node* acc = torch::autograd::impl::gradient_edge(t).function.get();
      if (acc != nullptr && acc == weight_acc && weight_acc->name() == "torch::autograd::AccumulateGrad") {
        roles.emplace_back("weight");
      } else if (acc != nullptr && acc == bias_acc && bias_acc->name() == "torch::autograd::AccumulateGrad") {
        roles.emplace_back("bias");
      } else {
        return py::none();
      }
    }
    if (!x.defined() || x.dim() != 2 || h.numel() != x.size(0) * h.size(-1)) return py::none();
    if (reaches(node->next_edges()[x_input].function.get(), shared)) return py::none();
    py::object relu_out = py::none(), jac = py::none();
    if (acts.size() == 1 && acts[0]->name() == "ReluBackward0") {
      auto* relu = static_cast<torch::autograd::generated::ReluBackward0*>(acts[0]);
      relu_out = py::cast(relu->result_.unpack(acts[0]->getptr()).detach());
    } else if (!acts.empty()) {
      at::NoGradGuard no_grad;
      at::Tensor ones = at::ones_like(h);
      variable_list grads{ones};
      for (Node* act : acts) grads = (*act)(std::move(grads));
      jac = py::cast(grads[0]);
    }
    return py::make_tuple(x, roles, relu_out, jac);
  }

  void end() {
    consumers_.clear();
    Step& s = *step_;
    std::lock_guard<std::mutex> guard(s.lock);
    s.active = false;
    s.h = s.out = s.delta_rows = s.x = s.dw = s.relu_out = s.jac = at::Tensor();
    s.rows.clear();
    s.slots.clear();
    s.filled.clear();
    s.order.clear();
    s.partial.clear();
  }

 private:
  Step& reset(const at::Tensor& h, const at::Tensor& out, at::ScalarType norm_dtype) {
    Step& s = *step_;
    std::lock_guard<std::mutex> guard(s.lock);
    s.generation += 1;
    s.h = h;
    s.out = out;
    s.norm_dtype = norm_dtype;
    s.pos = 0;
    s.filled.clear();
    s.order.clear();
    s.partial.clear();
    const size_t num_tasks = consumers_.size();
    s.done.assign(num_tasks, 0);
    s.remaining.assign(num_tasks, 0);
    for (size_t i = 0; i < num_tasks; ++i) {
      s.remaining[i] = static_cast<int64_t>(consumers_[i].size());
    }
    return s;
  }

  void hook() {
    Step& s = *step_;
    for (size_t i = 0; i < consumers_.size(); ++i) {
      const bool single = consumers_[i].size() == 1;
      for (const auto& c : consumers_[i]) {
        c.first->add_post_hook(std::make_unique<TaskHook>(
            step_, s.generation, static_cast<int64_t>(i), c.second, single));
      }
    }
    consumers_.clear();
    s.active = true;
  }

  std::shared_ptr<Step> step_;
  Consumers consumers_;
  at::Tensor delta_, delta_rows_;  // the chunk buffer last seen, and its views
  std::vector<at::Tensor> slots_;
};

}  // namespace

void bind_capture(py::module_& m) {
  py::class_<NativeCapture>(m, "NativeCapture")
      .def(py::init<>())
      .def("walk", &NativeCapture::walk)
      .def("num_consumers", &NativeCapture::num_consumers)
      .def("begin_h", &NativeCapture::begin_h)
      .def("begin_linear", &NativeCapture::begin_linear)
      .def("finish", &NativeCapture::finish)
      .def("match_linear", &NativeCapture::match_linear)
      .def("end", &NativeCapture::end);
}
