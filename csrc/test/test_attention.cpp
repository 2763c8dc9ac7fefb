// ctest: calls rollingq::attention_fwd / attention_bwd through the dispatcher on
// small cases (all-query with lengths, class-only with a per-head rotation) in
// float64, and in float32 at every instruction-set level of the float row
// kernels this CPU runs, and compares every output with a naive float64
// softmax attention written here. Exits non-zero on any mismatch.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>

#include <cctype>
#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_capability.h"
#include "float_row_ops.h"

namespace {

using at::Tensor;
using Fwd = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                              c10::IntArrayRef, const std::optional<Tensor>&,
                                                              const std::optional<Tensor>&, double, double, int64_t,
                                                              bool);
using Bwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                               const Tensor&, const Tensor&, c10::IntArrayRef,
                                               const std::optional<Tensor>&, const std::optional<Tensor>&, double,
                                               double, int64_t);

int failures = 0;

void expect_close(const std::string& what, const Tensor& actual, const Tensor& expected, double tol) {
  const Tensor a = actual.to(at::kDouble).contiguous(), e = expected.to(at::kDouble).contiguous();
  if (a.sizes() != e.sizes()) {
    std::printf("FAIL %s: shape mismatch\n", what.c_str());
    ++failures;
    return;
  }
  double err = 0;
  const double* pa = a.const_data_ptr<double>();
  const double* pe = e.const_data_ptr<double>();
  for (int64_t i = 0; i < a.numel(); ++i) err = std::max(err, std::abs(pa[i] - pe[i]));
  std::printf("%s %s: max error %.3g (tolerance %.1g)\n", err <= tol ? "ok  " : "FAIL", what.c_str(), err, tol);
  if (!(err <= tol)) ++failures;
}

struct Naive {
  Tensor out, lse, key_mean, mass, query, dq, dk, dv;
};

// Naive float64 attention of docs/op.md (no dropout) and its gradients.
// rot: (H, Dh, Dh) per-head rotation or undefined; lengths: (B, M) or undefined.
Naive naive_attention(const Tensor& q, const Tensor& k, const Tensor& v, const std::vector<int64_t>& segs,
                      const Tensor& lengths, const Tensor& rot, double scale, const Tensor& g) {
  const int64_t B = k.size(0), H = k.size(1), N = k.size(2), Dh = k.size(3), Nq = q.size(2);
  const int64_t M = static_cast<int64_t>(segs.size());
  const auto opt = q.options();
  Naive r{at::zeros({B, H, Nq, Dh}, opt), at::zeros({B, H, Nq}, opt), at::zeros({B, H, M, Dh}, opt),
          at::zeros({B, H, M + 1}, opt), at::zeros({B, H, Dh}, opt), at::zeros(q.sizes(), opt),
          at::zeros(k.sizes(), opt), at::zeros(v.sizes(), opt)};
  auto Q = q.accessor<double, 4>(), K = k.accessor<double, 4>(), V = v.accessor<double, 4>(),
       G = g.accessor<double, 4>();
  auto O = r.out.accessor<double, 4>(), DQ = r.dq.accessor<double, 4>(), DK = r.dk.accessor<double, 4>(),
       DV = r.dv.accessor<double, 4>();
  std::vector<int> seg_of(N, 0);
  std::vector<int64_t> start(M);
  for (int64_t m = 0, o = 1; m < M; o += segs[m], ++m) {
    start[m] = o;
    for (int64_t j = o; j < o + segs[m]; ++j) seg_of[j] = static_cast<int>(m + 1);
  }
  for (int64_t b = 0; b < B; ++b) {
    std::vector<bool> valid(N, true);
    for (int64_t j = 1; j < N; ++j)
      if (lengths.defined()) valid[j] = j - start[seg_of[j] - 1] < lengths[b][seg_of[j] - 1].item<int64_t>();
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < Nq; ++i) {
        if (Nq > 1 && !valid[i]) continue;  // padded query row: output 0, no gradient
        std::vector<double> qi(Dh);
        for (int64_t d = 0; d < Dh; ++d) qi[d] = Q[b][h][i][d];
        if (i == 0 && rot.defined())
          for (int64_t e = 0; e < Dh; ++e) {
            qi[e] = 0;
            for (int64_t d = 0; d < Dh; ++d) qi[e] += Q[b][h][0][d] * rot[h][e][d].item<double>();
          }
        std::vector<double> p(N, 0.0);
        double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j < N; ++j) {
          if (!valid[j]) continue;
          for (int64_t d = 0; d < Dh; ++d) p[j] += qi[d] * K[b][h][j][d];
          p[j] *= scale;
          mx = std::max(mx, p[j]);
        }
        for (int64_t j = 0; j < N; ++j) sum += valid[j] ? std::exp(p[j] - mx) : 0.0;
        for (int64_t j = 0; j < N; ++j) p[j] = valid[j] ? std::exp(p[j] - mx) / sum : 0.0;
        r.lse[b][h][i] = mx + std::log(sum);
        double delta = 0;
        std::vector<double> dp(N, 0.0);
        for (int64_t j = 0; j < N; ++j)
          for (int64_t d = 0; d < Dh; ++d) {
            O[b][h][i][d] += p[j] * V[b][h][j][d];
            DV[b][h][j][d] += p[j] * G[b][h][i][d];
            dp[j] += G[b][h][i][d] * V[b][h][j][d];
          }
        for (int64_t j = 0; j < N; ++j) delta += p[j] * dp[j];
        std::vector<double> dqi(Dh, 0.0);
        for (int64_t j = 0; j < N; ++j) {
          const double ds = p[j] * (dp[j] - delta) * scale;
          for (int64_t d = 0; d < Dh; ++d) {
            dqi[d] += ds * K[b][h][j][d];
            DK[b][h][j][d] += ds * qi[d];
          }
        }
        for (int64_t d = 0; d < Dh; ++d) {
          double x = dqi[d];
          if (i == 0 && rot.defined()) {  // dq0 = dq0_rot @ R
            x = 0;
            for (int64_t e = 0; e < Dh; ++e) x += dqi[e] * rot[h][e][d].item<double>();
          }
          DQ[b][h][i][d] = x;
        }
        if (i != 0) continue;
        for (int64_t d = 0; d < Dh; ++d) r.query[b][h][d] = qi[d];
        for (int64_t j = 0; j < N; ++j) r.mass[b][h][seg_of[j]] += p[j];
        for (int64_t m = 0; m < M; ++m) {
          int64_t count = 0;
          for (int64_t j = start[m]; j < start[m] + segs[m]; ++j) {
            if (!valid[j]) continue;
            ++count;
            for (int64_t d = 0; d < Dh; ++d) r.key_mean[b][h][m][d] += K[b][h][j][d];
          }
          if (count > 0) r.key_mean[b][h][m] /= static_cast<double>(count);
        }
      }
    }
  }
  return r;
}

// Tolerances of one dtype: the output, the statistics, the gradients.
struct Tolerance {
  double out, stats, grad;
};

void run_case(const std::string& name, int64_t B, int64_t H, int64_t Dh, const std::vector<int64_t>& segs,
              bool class_only, const Tensor& lengths, const Tensor& rot, at::ScalarType dtype = at::kDouble) {
  std::printf("-- %s (%s)\n", name.c_str(), c10::toString(dtype));
  int64_t N = 1;
  for (int64_t s : segs) N += s;
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  // inputs rounded to dtype, the naive reference in float64 on the rounded values
  const Tensor q = at::randn({B, H, class_only ? 1 : N, Dh}, opt).to(dtype).to(at::kDouble),
               k = at::randn({B, H, N, Dh}, opt).to(dtype).to(at::kDouble),
               v = at::randn({B, H, N, Dh}, opt).to(dtype).to(at::kDouble),
               g = at::randn(q.sizes(), opt).to(dtype).to(at::kDouble);
  const Tolerance tol = dtype == at::kDouble ? Tolerance{1e-12, 1e-6, 1e-10} : Tolerance{2e-5, 2e-5, 1e-4};
  const double scale = 1.0 / std::sqrt(static_cast<double>(Dh));
  static auto fwd =
      c10::Dispatcher::singleton().findSchemaOrThrow("rollingq::attention_fwd", "").typed<Fwd>();
  static auto bwd =
      c10::Dispatcher::singleton().findSchemaOrThrow("rollingq::attention_bwd", "").typed<Bwd>();
  const std::optional<Tensor> len = lengths.defined() ? std::optional<Tensor>(lengths) : std::nullopt;
  const std::optional<Tensor> r = rot.defined() ? std::optional<Tensor>(rot) : std::nullopt;
  const Tensor qd = q.to(dtype), kd = k.to(dtype), vd = v.to(dtype), gd = g.to(dtype);
  auto [out, lse, key_mean, mass, query] = fwd.call(qd, kd, vd, segs, len, r, scale, 0.0, 0, true);
  auto [dq, dk, dv] = bwd.call(gd, qd, kd, vd, out, lse, segs, len, r, scale, 0.0, 0);
  const Naive ref = naive_attention(q, k, v, segs, lengths, rot, scale, g);
  expect_close("out", out, ref.out, tol.out);
  expect_close("key_mean", key_mean, ref.key_mean, tol.stats);
  expect_close("mass", mass, ref.mass, tol.stats);
  expect_close("query", query, ref.query, tol.stats);
  expect_close("dq", dq, ref.dq, tol.grad);
  expect_close("dk", dk, ref.dk, tol.grad);
  expect_close("dv", dv, ref.dv, tol.grad);
  // lse of padded query rows is unspecified: compare valid rows only (row 0 always valid)
  expect_close("lse[row 0]", lse.select(2, 0), ref.lse.select(2, 0), 1e-5);
}

void expect_error_naming(const std::string& arg, const Tensor& lengths) {
  const auto opt = at::TensorOptions().dtype(at::kFloat);
  const Tensor q = at::randn({1, 1, 6, 4}, opt), k = at::randn({1, 1, 6, 4}, opt), v = at::randn({1, 1, 6, 4}, opt);
  auto fwd = c10::Dispatcher::singleton().findSchemaOrThrow("rollingq::attention_fwd", "").typed<Fwd>();
  try {
    fwd.call(q, k, v, std::vector<int64_t>{2, 3}, lengths, std::nullopt, 0.5, 0.0, 0, true);
    std::printf("FAIL bad %s: no error\n", arg.c_str());
    ++failures;
  } catch (const c10::Error& e) {
    const bool named = std::string(e.what()).find(arg) != std::string::npos;
    std::printf("%s bad %s raises an error naming it\n", named ? "ok  " : "FAIL", arg.c_str());
    if (!named) ++failures;
  }
}

}  // namespace

int main() {
  const Tensor lengths = at::tensor(std::vector<int64_t>{4, 0, 1, 7}).reshape({2, 2});
  run_case("all-query, lengths (empty modality)", 2, 3, 5, {5, 7}, false, lengths, Tensor());
  Tensor rot = at::zeros({2, 6, 6}, at::TensorOptions().dtype(at::kDouble));
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t e = 0; e < 6; ++e) rot[h][e][(e + 1 + h) % 6] = (e % 2 ? -1.0 : 1.0);  // signed permutation
  run_case("class-only, per-head rotation, M = 3", 3, 2, 6, {3, 1, 4}, true, Tensor(), rot);
  // float32 goes through the float row kernels of the chosen instruction set: run every level
  const rollingq::CpuCapability chosen = rollingq::cpu_capability();
  for (rollingq::CpuCapability level : rollingq::supported_capabilities()) {
    rollingq::set_cpu_capability(level);
    const std::string tag = std::string(" [") + rollingq::capability_name(level) + "]";
    std::string table = rollingq::float_row_ops().level;  // the unit's CPU_CAPABILITY, upper case
    for (char& ch : table) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    const bool switched = table == rollingq::capability_name(level);
    std::printf("%s the float row table of%s is the %s unit's\n", switched ? "ok  " : "FAIL", tag.c_str(),
                table.c_str());
    if (!switched) ++failures;
    run_case("all-query, lengths (empty modality)" + tag, 2, 3, 37, {5, 7}, false, lengths, Tensor(), at::kFloat);
    run_case("class-only, per-head rotation, M = 3" + tag, 3, 2, 6, {3, 1, 4}, true, Tensor(), rot, at::kFloat);
  }
  rollingq::set_cpu_capability(chosen);
  expect_error_naming("lengths", at::tensor(std::vector<int64_t>{3, 3}).reshape({1, 2}));
  std::printf(failures ? "%d FAILURES\n" : "all passed\n", failures);
  return failures ? 1 : 0;
}
