// Greedy MAP inference for the score-weighted log-det DPP objective of trustrepair (paper Eq. 7):
//
//     f(S) = log det(K_S + I) + eta * log(sum_{i in S} s_i),    K_ij = exp(-gamma * ||e_i - e_j||^2).
//
// Pure C++ (no Python types): the pybind11 layer in dpp_bindings.cpp validates the buffers and calls
// this with the GIL released. The algorithm is described in dpp_greedy.cpp.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace trustrepair {

struct GreedyResult {
    std::vector<int64_t> picks;   // selected row indices, in selection order
    std::vector<double> gains;    // gains[0] = f({picks[0]}); gains[t] = f(S_t+1) - f(S_t) for t >= 1
    int64_t kernel_entries = 0;   // kernel values K_ij evaluated (each reads one embedding row pair)
    int64_t row_reads = 0;        // candidate re-evaluations: each reads the candidate's row once
};

// emb: (n, d) row-major; scores: (n,), every s_i >= 0 and, when eta > 0, at least one s_i > 0.
// Preconditions (checked by the caller): n >= 1, d >= 1, k >= 0, eta >= 0 finite, gamma > 0 finite,
// all values finite. num_threads <= 0 means the OpenMP default. lazy=false runs the eager greedy
// (every candidate re-evaluated at every step); both modes return the same picks and gains.
template <typename T>
GreedyResult greedy_logdet_dpp(const T* emb, const double* scores, int64_t n, int64_t d, int64_t k,
                               double eta, double gamma, bool lazy, int num_threads);

// The compiled variants of the candidate updates this CPU can run ("avx512", "avx2", "baseline"), widest
// first, and the one a selection uses: the widest, or the one named by the environment variable
// TRUSTREPAIR_DPP_SIMD (std::invalid_argument when it names no supported variant).
std::vector<std::string> simd_variants();
std::string simd_variant();

// exp(x) for x <= 0 as the selection's kernels compute it (the current simd_variant()), for testing.
void kernel_exp(const double* x, double* out, int64_t n);

extern template GreedyResult greedy_logdet_dpp<float>(const float*, const double*, int64_t, int64_t,
                                                      int64_t, double, double, bool, int);
extern template GreedyResult greedy_logdet_dpp<double>(const double*, const double*, int64_t, int64_t,
                                                       int64_t, double, double, bool, int);

}  // namespace trustrepair
