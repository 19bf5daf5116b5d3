// Batched top-k / top-p sampling, one row per task; a row never looks at another row's data, so
// its token depends only on its logits, parameters and uniform (batch invariance).
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"

namespace shardserve {
namespace cpu {
namespace {

// Total order used everywhere: higher z first, then lower token id (= torch's stable sort).
struct Desc {
  const double* z;
  bool operator()(int64_t a, int64_t b) const { return z[a] > z[b] || (z[a] == z[b] && a < b); }
};

int64_t argmax_row(const float* l, int64_t V) {
  int64_t best = 0;
  for (int64_t i = 1; i < V; ++i)
    if (l[i] > l[best]) best = i;
  return best;
}

int64_t sample_row(const float* l, int64_t V, float temperature, int64_t top_k, float top_p,
                   double u, std::vector<double>& z, std::vector<int64_t>& idx,
                   std::vector<unsigned char>& keep) {
  z.resize(static_cast<size_t>(V));
  keep.assign(static_cast<size_t>(V), 0);
  double zmax = -INFINITY;
  for (int64_t i = 0; i < V; ++i) {
    z[i] = static_cast<double>(l[i]) / static_cast<double>(temperature);
    zmax = std::max(zmax, z[i]);
  }
  const bool use_k = top_k > 0 && top_k < V;
  const bool use_p = top_p < 1.f;
  const Desc desc{z.data()};
  // Sorted prefix of the order that decides the kept set: first `n_sorted` ids in order.
  int64_t n_sorted = 0;
  idx.resize(static_cast<size_t>(V));
  for (int64_t i = 0; i < V; ++i) idx[i] = i;
  auto sort_prefix = [&](int64_t n) {
    if (n < V) std::nth_element(idx.begin(), idx.begin() + n, idx.end(), desc);
    std::sort(idx.begin(), idx.begin() + n, desc);
    n_sorted = n;
  };
  int64_t kept_n = V;  // kept set = idx[0:kept_n] once sorted, or everything
  double norm = 0.0;   // softmax denominator over the top-k set (index order)
  if (use_k) {
    sort_prefix(top_k);
    kept_n = top_k;
    for (int64_t j = 0; j < top_k; ++j) keep[idx[j]] = 1;
    for (int64_t i = 0; i < V; ++i)
      if (keep[i]) norm += std::exp(z[i] - zmax);
  } else {
    for (int64_t i = 0; i < V; ++i) norm += std::exp(z[i] - zmax);
  }
  if (use_p) {
    // keep idx[j] while the probability mass before it is < top_p (at least one token)
    int64_t n = std::min<int64_t>(kept_n, 1024);
    while (true) {
      if (n_sorted < n) sort_prefix(n);
      double cum = 0.0;
      int64_t m = 0;
      bool decided = false;
      for (int64_t j = 0; j < n; ++j) {
        if (j > 0 && cum >= static_cast<double>(top_p)) {
          decided = true;
          break;
        }
        cum += std::exp(z[idx[j]] - zmax) / norm;
        m = j + 1;
      }
      if (decided || n == kept_n) {
        kept_n = m;
        break;
      }
      n = std::min<int64_t>(kept_n, n * 8);
    }
    std::fill(keep.begin(), keep.end(), 0);
    for (int64_t j = 0; j < kept_n; ++j) keep[idx[j]] = 1;
  } else if (!use_k) {
    std::fill(keep.begin(), keep.end(), 1);
  }
  // inverse CDF over kept tokens in index order
  double total = 0.0;
  for (int64_t i = 0; i < V; ++i)
    if (keep[i]) total += std::exp(z[i] - zmax) / norm;
  const double target = u * total;
  double cum = 0.0;
  int64_t last = -1;
  for (int64_t i = 0; i < V; ++i) {
    if (!keep[i]) continue;
    cum += std::exp(z[i] - zmax) / norm;
    last = i;
    if (cum > target) return i;
  }
  return last;
}

}  // namespace

void sample_top_k_top_p(const float* logits, const float* temperature, const int64_t* top_k,
                        const float* top_p, const double* uniforms, int64_t* out, int64_t B,
                        int64_t V) {
#pragma omp parallel if (B > 1)
  {
    std::vector<double> z;
    std::vector<int64_t> idx;
    std::vector<unsigned char> keep;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      const float* l = logits + b * V;
      if (!(temperature[b] > 0.f)) {
        out[b] = argmax_row(l, V);
      } else {
        out[b] = sample_row(l, V, temperature[b], top_k[b], top_p[b], uniforms[b], z, idx, keep);
      }
    }
  }
}

}  // namespace cpu
}  // namespace shardserve
