// GradNorm's update of the weights once the norms are known (GradNorm._step from the norms
// on, and the weights' Adam step), for T-vectors on the CPU, as one loop over the tasks in
// double precision. On a small network the ~20 ATen operations of the Python code cost
// ~0.05x of the training step (4-7 us each, most of it dispatch and allocation, with the
// model's step evicting the caches between steps); this loop costs well under a
// microsecond. The results agree with the Python code's to float rounding (the Python
// code rounds each operation to the tensors' dtype, this loop rounds the results only).
//
// Chen et al., GradNorm (ICML 2018), Algorithm 1, with w the weights of this step:
//   ||grad_W L_i|| = G_i / w_i;  L~_i = L_i / L_i(0);  r_i = L~_i / mean_j L~_j
//   target_i = mean_j G_j * r_i^alpha;  dL_grad/dw_i = sign(G_i - target_i) ||grad_W L_i||
// Adam (Kingma & Ba; torch.optim.Adam without weight decay, amsgrad or maximize), step t:
//   m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
//   p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// then the floor and the renormalisation: w <- max(w, floor); w <- w * T / sum_j w_j.

#include <torch/python.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace py = pybind11;

namespace {

double read_scalar(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? *t.const_data_ptr<double>()
                                        : static_cast<double>(*t.const_data_ptr<float>());
}

void write_scalar(at::Tensor& t, double value) {
  if (t.scalar_type() == at::kDouble) {
    *t.data_ptr<double>() = value;
  } else {
    *t.data_ptr<float>() = static_cast<float>(value);
  }
}

template <typename scalar_t>
void update(const at::Tensor& grad_norm_w, const at::Tensor& w, const at::Tensor& values,
            at::Tensor& initial_losses, bool first, double alpha, at::Tensor& weights,
            double min_weight, double t, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
            double lr, double beta1, double beta2, double eps, at::Tensor& stats) {
  const int64_t n = weights.numel();
  const scalar_t* G = grad_norm_w.const_data_ptr<scalar_t>();
  const scalar_t* wt = w.const_data_ptr<scalar_t>();
  const scalar_t* L = values.const_data_ptr<scalar_t>();
  scalar_t* L0 = initial_losses.data_ptr<scalar_t>();
  scalar_t* p = weights.data_ptr<scalar_t>();
  scalar_t* m = exp_avg.data_ptr<scalar_t>();
  scalar_t* v = exp_avg_sq.data_ptr<scalar_t>();
  scalar_t* target = stats.data_ptr<scalar_t>();
  scalar_t* loss_ratio = target + n;
  scalar_t* inverse_rate = loss_ratio + n;
  scalar_t* gradnorm_loss = inverse_rate + n;

  std::vector<double> ratio(n);
  double g_mean = 0.0, r_mean = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (first) L0[i] = L[i];
    ratio[i] = static_cast<double>(L[i]) / static_cast<double>(L0[i]);
    g_mean += static_cast<double>(G[i]);
    r_mean += ratio[i];
  }
  g_mean /= static_cast<double>(n);
  r_mean /= static_cast<double>(n);
  const double step_size = lr / (1.0 - std::pow(beta1, t));
  const double bias2_sqrt = std::sqrt(1.0 - std::pow(beta2, t));
  double l_grad = 0.0, total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double g = static_cast<double>(G[i]);
    const double r = ratio[i] / r_mean;
    const double tgt = g_mean * std::pow(r, alpha);
    const double gap = g - tgt;
    const double sign = gap > 0.0 ? 1.0 : (gap < 0.0 ? -1.0 : (gap == 0.0 ? 0.0 : gap));
    const double grad = sign * (g / static_cast<double>(wt[i]));
    const double mi = beta1 * static_cast<double>(m[i]) + (1.0 - beta1) * grad;
    const double vi = beta2 * static_cast<double>(v[i]) + (1.0 - beta2) * grad * grad;
    m[i] = static_cast<scalar_t>(mi);
    v[i] = static_cast<scalar_t>(vi);
    const double denom = std::sqrt(static_cast<double>(v[i])) / bias2_sqrt + eps;
    double pi = static_cast<double>(p[i]) - step_size * static_cast<double>(m[i]) / denom;
    pi = std::isnan(pi) ? pi : std::max(pi, min_weight);  // the floor (clamp keeps a nan)
    p[i] = static_cast<scalar_t>(pi);
    total += static_cast<double>(p[i]);
    target[i] = static_cast<scalar_t>(tgt);
    loss_ratio[i] = static_cast<scalar_t>(ratio[i]);
    inverse_rate[i] = static_cast<scalar_t>(r);
    l_grad += std::abs(gap);
  }
  const double scale = static_cast<double>(n) / total;
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(static_cast<double>(p[i]) * scale);
  *gradnorm_loss = static_cast<scalar_t>(l_grad);
}

bool eligible(const at::Tensor& t, const at::Tensor& weights) {
  return t.device().is_cpu() && t.is_contiguous() && t.numel() == weights.numel() &&
         t.scalar_type() == weights.scalar_type();
}

// Returns (target, loss_ratio, inverse_rate, gradnorm_loss), new tensors, and updates the
// weights, L_i(0) on the first step, the Adam state and the step counts in place; or
// returns None, changing nothing, when a norm is not finite (the caller's checks then
// decide) or a tensor is not what the loop reads: every T-vector a contiguous CPU tensor
// of the weights' dtype (float32 or float64), the step counts CPU scalars.
py::object gradnorm_update(
    const at::Tensor& grad_norm_w, const at::Tensor& w, const at::Tensor& values,
    at::Tensor initial_losses, bool first, double alpha, at::Tensor weights,
    at::Tensor num_steps, double min_weight, at::Tensor step, at::Tensor exp_avg,
    at::Tensor exp_avg_sq, double lr, double beta1, double beta2, double eps) {
  const at::ScalarType dtype = weights.scalar_type();
  if (!(dtype == at::kFloat || dtype == at::kDouble) || !weights.device().is_cpu() ||
      !weights.is_contiguous()) {
    return py::none();
  }
  const std::vector<const at::Tensor*> vectors = {&grad_norm_w, &w,       &values,
                                                 &initial_losses, &exp_avg, &exp_avg_sq};
  for (const at::Tensor* t : vectors) {
    if (!eligible(*t, weights)) return py::none();
  }
  if (!step.device().is_cpu() || step.numel() != 1 ||
      !(step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble) ||
      !num_steps.device().is_cpu() || num_steps.scalar_type() != at::kLong) {
    return py::none();
  }
  const int64_t n = weights.numel();
  if (dtype == at::kDouble) {
    const double* G = grad_norm_w.const_data_ptr<double>();
    for (int64_t i = 0; i < n; ++i) {
      if (!std::isfinite(G[i])) return py::none();
    }
  } else {
    const float* G = grad_norm_w.const_data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      if (!std::isfinite(G[i])) return py::none();
    }
  }
  const double t = read_scalar(step) + 1.0;
  at::Tensor stats = at::empty({3 * n + 1}, weights.options());
  if (dtype == at::kDouble) {
    update<double>(grad_norm_w, w, values, initial_losses, first, alpha, weights, min_weight, t,
                   exp_avg, exp_avg_sq, lr, beta1, beta2, eps, stats);
  } else {
    update<float>(grad_norm_w, w, values, initial_losses, first, alpha, weights, min_weight, t,
                  exp_avg, exp_avg_sq, lr, beta1, beta2, eps, stats);
  }
  write_scalar(step, t);
  *num_steps.data_ptr<int64_t>() += 1;
  return py::make_tuple(stats.narrow(0, 0, n), stats.narrow(0, n, n),
                        stats.narrow(0, 2 * n, n), stats.select(0, 3 * n));
}

}  // namespace

void bind_update(py::module_& m) {
  m.def("gradnorm_update", &gradnorm_update);
}
