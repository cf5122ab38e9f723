// pybind11 module trustrepair._dpp: validates numpy buffers, releases the GIL, runs the greedy selector
// of dpp_greedy.cpp and returns numpy arrays. Python users call trustrepair.select.select_dpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "dpp_greedy.hpp"

namespace py = pybind11;

namespace {

template <typename T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

std::string fmt(double v) { return py::str(py::float_(v)).cast<std::string>(); }

void validate(const CArray<double>& scores, int64_t n, int64_t d, int64_t k, double eta, double gamma) {
    if (n == 0) throw py::value_error("scores is empty: there is nothing to select from (N = 0)");
    if (d == 0) throw py::value_error("embeddings have 0 columns: give at least one feature per row");
    if (k < 0) throw py::value_error("k = " + std::to_string(k) + " is negative: ask for k >= 0 rows");
    if (!std::isfinite(eta) || eta < 0.0)
        throw py::value_error("eta = " + fmt(eta) + " must be finite and >= 0 (eta = 0 is pure diversity)");
    if (!std::isfinite(gamma) || gamma <= 0.0)
        throw py::value_error("gamma = " + fmt(gamma) + " must be finite and > 0 (the RBF bandwidth)");
    const double* s = scores.data();
    bool any_positive = false;
    for (int64_t i = 0; i < n; ++i) {
        if (!std::isfinite(s[i]))
            throw py::value_error("scores[" + std::to_string(i) + "] = " + fmt(s[i]) +
                                  " is not finite: drop or impute that example");
        if (s[i] < 0.0)
            throw py::value_error("scores[" + std::to_string(i) + "] = " + fmt(s[i]) +
                                  " is negative: the selector needs normalised scores s >= 0");
        any_positive = any_positive || s[i] > 0.0;
    }
    if (eta > 0.0 && !any_positive)
        throw py::value_error(
            "every score is 0, so eta * log(sum s) = -inf for every subset: give some positive score or use eta = 0");
}

// True when every value of x[0..d) is finite. Branch-free over the row (an OR of "exponent all ones"
// over the bit patterns), so that the compiler vectorises it: one pass at memory speed.
template <typename T>
bool row_is_finite(const T* x, int64_t d) {
    using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    constexpr Bits exponent = sizeof(T) == 4 ? Bits(0x7f800000u) : Bits(0x7ff0000000000000ull);
    Bits bad = 0;
    for (int64_t l = 0; l < d; ++l) {
        Bits b;
        std::memcpy(&b, x + l, sizeof(b));
        bad |= static_cast<Bits>((b & exponent) == exponent);
    }
    return bad == 0;
}

template <typename T>
void validate_rows(const CArray<T>& emb, int64_t n, int64_t d) {
    const T* e = emb.data();
    for (int64_t i = 0; i < n; ++i) {
        if (row_is_finite(e + i * d, d)) continue;
        for (int64_t l = 0; l < d; ++l)
            if (!std::isfinite(e[i * d + l]))
                throw py::value_error("embeddings row " + std::to_string(i) + " has a non-finite value (" +
                                      fmt(static_cast<double>(e[i * d + l])) + " in column " +
                                      std::to_string(l) + "): drop or recompute that example");
    }
}

template <typename T>
py::tuple greedy(const CArray<double>& scores, const CArray<T>& embeddings, int64_t k, double eta, double gamma,
                 bool lazy, int num_threads) {
    if (scores.ndim() != 1)
        throw py::value_error("scores must be 1-D (N,), got " + std::to_string(scores.ndim()) + " dimensions");
    if (embeddings.ndim() != 2)
        throw py::value_error("embeddings must be 2-D (N, d), got " + std::to_string(embeddings.ndim()) +
                              " dimensions");
    const int64_t n = scores.shape(0), d = embeddings.shape(1);
    if (embeddings.shape(0) != n)
        throw py::value_error("embeddings have " + std::to_string(embeddings.shape(0)) + " rows but scores has " +
                              std::to_string(n) + " entries: give one embedding row per score");
    validate(scores, n, d, k, eta, gamma);
    validate_rows(embeddings, n, d);

    trustrepair::GreedyResult r;
    {
        py::gil_scoped_release release;
        r = trustrepair::greedy_logdet_dpp<T>(embeddings.data(), scores.data(), n, d, k, eta, gamma, lazy,
                                              num_threads);
    }
    const auto m = static_cast<py::ssize_t>(r.picks.size());
    py::array_t<int64_t> picks(m);
    py::array_t<double> gains(m);
    std::copy(r.picks.begin(), r.picks.end(), picks.mutable_data());
    std::copy(r.gains.begin(), r.gains.end(), gains.mutable_data());
    return py::make_tuple(picks, gains, r.kernel_entries, r.row_reads);
}

CArray<double> kernel_exp(const CArray<double>& x) {
    for (py::ssize_t i = 0; i < x.size(); ++i)
        if (!(x.data()[i] <= 0.0)) throw py::value_error("_kernel_exp takes x <= 0 (the exponents of kernel values)");
    CArray<double> out(x.request().shape);
    trustrepair::kernel_exp(x.data(), out.mutable_data(), x.size());
    return out;
}

constexpr const char* kDoc = R"doc(Greedy MAP selection for f(S) = log det(K_S + I) + eta * log(sum_{i in S} s_i).

K_ij = exp(-gamma * ||e_i - e_j||^2). Greedy with incremental Cholesky on K + I; lazy=True re-evaluates
only candidates whose stale gain bound reaches the top of a priority queue (same picks as lazy=False).
float32 embeddings are read as float32; all arithmetic is float64. The GIL is released.

Args:
    scores: (N,) float64, s_i >= 0 (already normalised), some s_i > 0 when eta > 0.
    embeddings: (N, d) float32 or float64, finite.
    k: number of picks (k >= N selects all N).
    eta: weight of the score term, finite and >= 0.
    gamma: RBF bandwidth, finite and > 0.
    lazy: lazy (True) or eager (False) greedy.
    num_threads: OpenMP threads; <= 0 uses the OpenMP default. Results do not depend on it.

Returns:
    (picks int64 (m,), gains float64 (m,), kernel_entries int, row_reads int); m = min(k, N) unless
    the greedy stopped early because no candidate had a positive gain. gains[0] = f({picks[0]}),
    gains[t] = f(S_{t+1}) - f(S_t).

Raises:
    ValueError: on empty, mismatched, non-finite or out-of-range input (naming the first bad row).
)doc";

}  // namespace

PYBIND11_MODULE(_dpp, m) {
    m.doc() = "Greedy log-det DPP selector (C++, OpenMP) behind trustrepair.select.select_dpp.";
    // float64 first: arrays of other dtypes are converted to float64, never narrowed to float32.
    m.def("greedy", &greedy<double>, py::arg("scores"), py::arg("embeddings"), py::arg("k"), py::arg("eta"),
          py::arg("gamma"), py::arg("lazy") = true, py::arg("num_threads") = 0, kDoc);
    m.def("greedy", &greedy<float>, py::arg("scores"), py::arg("embeddings"), py::arg("k"), py::arg("eta"),
          py::arg("gamma"), py::arg("lazy") = true, py::arg("num_threads") = 0, kDoc);
    m.def("simd_variant", &trustrepair::simd_variant,
          "The SIMD variant a selection uses: the widest this CPU runs ('avx512', 'avx2', 'baseline'), or the "
          "one named by the environment variable TRUSTREPAIR_DPP_SIMD (ValueError if it is not supported).");
    m.def("simd_variants", &trustrepair::simd_variants, "The SIMD variants this CPU runs, widest first.");
    m.def("_kernel_exp", &kernel_exp, py::arg("x"),
          "exp(x) for x <= 0 as the selector's kernels compute it (current simd_variant()); for tests.");
}
