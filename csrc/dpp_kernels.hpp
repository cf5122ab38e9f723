// The arithmetic of the greedy DPP selector: bringing candidates up to date with new picks, W candidates
// at a time (one per SIMD lane), compiled for the widest SIMD the running CPU has (AVX-512: W = 8,
// AVX2 + FMA: W = 4, baseline: W = 2) and chosen once when a selection starts.
//
// A candidate i with embedding row x (float32 or float64), Cholesky row c[0:from] and Schur complement d2
// is brought up to date with picks m = from..to-1 (see dpp_greedy.cpp):
//
//     K_m = exp(-gamma * max((||x||^2 + ||p_m||^2) - 2 <x, p_m>, 0))
//     e_m = (K_m - <V[m, 0:m], c[0:m]>) / V[m, m],    c[m] = e_m,    d2 -= e_m^2
//
// all in float64 (float32 rows are widened exactly). Each lane carries one candidate through exactly the
// same operations in the same order, whatever its group, lane or thread and whether the greedy is lazy
// or eager: dot products over the embedding are (sum over even l) + (sum over odd l), each summed in
// increasing l; the sum over q in the recurrence is ((q = 0 mod 4) + (1 mod 4)) + ((2 mod 4) + (3 mod 4)),
// each in increasing q. So a candidate's values never depend on how the work was split; they can differ
// in the last bits between CPUs that run different variants (FMA contraction differs).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

// The vector helpers below are always inlined into one target-specific variant, so GCC's note that
// passing wide vectors by value changes the ABI (reported where templates are instantiated, at the end
// of the translation unit) does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace trustrepair {

// The selected set as raw pointers (read-only while candidates are updated).
struct PicksView {
    int64_t d, kk;
    const double* rows;    // (kk, d) embeddings of the picks, widened to float64
    const double* sqnorm;  // (kk,)   ||p_m||^2
    const double* chol;    // (kk, kk) row m holds V[m, 0:m] = c_{j_m}[0:m]
    const double* diag;    // (kk,)   V[m, m] = sqrt(d2_{j_m}) at selection
};

constexpr int kMaxLanes = 8;

// Up to kMaxLanes candidates updated together; lanes beyond `lanes` are idle.
template <typename T>
struct CandidateGroup {
    int lanes = 0;
    const T* row[kMaxLanes];    // (d,) embedding rows
    double* chol[kMaxLanes];    // (kk,) Cholesky rows, valid on [0, from)
    double* d2[kMaxLanes];      // Schur complements
    int64_t from[kMaxLanes];    // picks each row is up to date with
};

namespace kernels {

template <int W>
struct Vec {
    typedef double type __attribute__((vector_size(8 * W)));
    typedef float narrow __attribute__((vector_size(4 * W)));
    typedef long long index __attribute__((vector_size(8 * W)));
};

template <int W>
__attribute__((always_inline)) inline typename Vec<W>::type load(const double* p) {
    typename Vec<W>::type v;
    __builtin_memcpy(&v, p, sizeof(v));
    return v;
}

template <int W>
__attribute__((always_inline)) inline void store(double* p, typename Vec<W>::type v) {
    __builtin_memcpy(p, &v, sizeof(v));
}

// W consecutive elements as float64 (float32 is widened exactly).
template <typename T, int W>
__attribute__((always_inline)) inline typename Vec<W>::type load_widened(const T* p) {
    if constexpr (std::is_same_v<T, double>) {
        return load<W>(p);
    } else {
        typename Vec<W>::narrow f;
        __builtin_memcpy(&f, p, sizeof(f));
        return __builtin_convertvector(f, typename Vec<W>::type);
    }
}

// Transposes the W x W block r[0..W) in registers: at each level h = W/2, ..., 1 the off-diagonal h x h
// blocks of every 2h x 2h block swap (two shuffles with constant masks per pair of rows).
template <int W, int H>
__attribute__((always_inline)) inline void swap_blocks(typename Vec<W>::type* r) {
    typedef typename Vec<W>::index I;
    I lo, hi;
    if constexpr (W == 2) {
        lo = I{0, 2}, hi = I{1, 3};
    } else if constexpr (W == 4 && H == 2) {
        lo = I{0, 1, 4, 5}, hi = I{2, 3, 6, 7};
    } else if constexpr (W == 4) {
        lo = I{0, 4, 2, 6}, hi = I{1, 5, 3, 7};
    } else if constexpr (H == 4) {
        lo = I{0, 1, 2, 3, 8, 9, 10, 11}, hi = I{4, 5, 6, 7, 12, 13, 14, 15};
    } else if constexpr (H == 2) {
        lo = I{0, 1, 8, 9, 4, 5, 12, 13}, hi = I{2, 3, 10, 11, 6, 7, 14, 15};
    } else {
        lo = I{0, 8, 2, 10, 4, 12, 6, 14}, hi = I{1, 9, 3, 11, 5, 13, 7, 15};
    }
    for (int i = 0; i < W; ++i)
        if (!(i & H)) {
            const typename Vec<W>::type a = r[i], b = r[i + H];
            r[i] = __builtin_shuffle(a, b, lo);
            r[i + H] = __builtin_shuffle(a, b, hi);
        }
}

template <int W>
__attribute__((always_inline)) inline void transpose_block(typename Vec<W>::type* r) {
    static_assert(W == 2 || W == 4 || W == 8, "lane counts of the compiled variants");
    if constexpr (W >= 8) swap_blocks<W, 4>(r);
    if constexpr (W >= 4) swap_blocks<W, 2>(r);
    swap_blocks<W, 1>(r);
}

// xt[l * W + w] = element l of row w, as float64; idle lanes repeat row 0.
template <typename T, int W>
__attribute__((always_inline)) inline void transpose_rows(const T* const* rows, int lanes, int64_t d, double* xt) {
    typename Vec<W>::type r[W];
    int64_t l = 0;
    for (; l + W <= d; l += W) {
        for (int w = 0; w < W; ++w) r[w] = load_widened<T, W>(rows[w < lanes ? w : 0] + l);
        transpose_block<W>(r);
        for (int w = 0; w < W; ++w) store<W>(xt + (l + w) * W, r[w]);
    }
    for (; l < d; ++l)
        for (int w = 0; w < W; ++w) xt[l * W + w] = static_cast<double>(rows[w < lanes ? w : 0][l]);
}

// exp(x) per lane for x <= 0, within 1 ulp of the libm value (tested against numpy.exp): x = k ln2 + r with
// |r| <= ln2/2 (Cody-Waite reduction, k*ln2_hi exact), exp(r) by its Taylor polynomial of degree 13
// (truncation below 1e-17 relative) in Horner form, times 2^k built in the exponent field. Values below
// 2^-1022 (x < -708.5, where 2^k would leave the normal range) are returned as 0 instead of subnormals.
template <int W>
__attribute__((always_inline)) inline void exp_nonpositive(typename Vec<W>::type* inout) {
    typedef typename Vec<W>::type V;
    typedef typename Vec<W>::index I;
    const V x = *inout;
    const double shifter = 0x1.8p52;  // adding it rounds to an integer, held in the low mantissa bits
    const V t = x * 0x1.71547652b82fep0 + shifter;  // x / ln2 + shifter
    const V k = t - shifter;
    const V r = (x - k * 0x1.62e42fefa3800p-1) - k * 0x1.ef35793c76730p-45;
    V p = r * (1.0 / 6227020800.0) + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const I k_int = (I)t - (I)(V{} + shifter);  // GNU vector casts reinterpret the bits
    const V y = p * (V)((k_int + 1023) << 52);
    *inout = x < -708.5 ? V{} : y;
}

// Per lane ||x||^2 from transposed rows: (sum over even l) + (sum over odd l), the order of the dot
// products in group_update, so that identical rows are exactly 0 apart.
template <int W>
__attribute__((always_inline)) inline void lane_sqnorm(const double* xt, int64_t d, typename Vec<W>::type* out) {
    typedef typename Vec<W>::type V;
    V even = {}, odd = {};
    int64_t l = 0;
    for (; l + 2 <= d; l += 2) {
        const V a = load<W>(xt + l * W), b = load<W>(xt + (l + 1) * W);
        even += a * a;
        odd += b * b;
    }
    if (l < d) {
        const V a = load<W>(xt + l * W);
        even += a * a;
    }
    *out = even + odd;
}

template <typename T, int W>
__attribute__((always_inline)) inline void group_sqnorm(const T* const* rows, int lanes, int64_t d, double* xt,
                                                        double* out) {
    typename Vec<W>::type sum;
    transpose_rows<T, W>(rows, lanes, d, xt);
    lane_sqnorm<W>(xt, d, &sum);
    for (int w = 0; w < lanes; ++w) out[w] = sum[w];
}

// The update described at the top of this file for a group of candidates. Picks are processed four at a
// time for the distances (eight independent accumulator chains), then one at a time for the recurrence,
// which is sequential in m. Lane w takes part in pick m only when from[w] <= m; otherwise its c[m] is
// already known and is kept. scratch holds (d + kk) * W doubles.
template <typename T, int W>
__attribute__((always_inline)) inline void group_update(const CandidateGroup<T>& g, int64_t to, const PicksView& P,
                                                        double gamma, double* scratch) {
    typedef typename Vec<W>::type V;
    const int64_t d = P.d;
    double* xt = scratch;          // (d, W)
    double* ct = scratch + d * W;  // (kk, W) Cholesky rows, transposed
    transpose_rows<T, W>(g.row, g.lanes, d, xt);
    V sq, d2, from;
    lane_sqnorm<W>(xt, d, &sq);
    int64_t lo = to;
    for (int w = 0; w < W; ++w) {
        const int src = w < g.lanes ? w : 0;
        d2[w] = *g.d2[src];
        from[w] = static_cast<double>(g.from[src]);
        lo = g.from[src] < lo ? g.from[src] : lo;
        for (int64_t q = 0; q < g.from[src]; ++q) ct[q * W + w] = g.chol[src][q];
    }
    for (int64_t m0 = lo; m0 < to; m0 += 4) {
        const int nb = to - m0 < 4 ? static_cast<int>(to - m0) : 4;
        // Four picks at once (eight independent accumulator chains); a last block of fewer picks fills
        // its empty slots with pick m0 and drops their results.
        V dots[4];
        {
            V e0 = {}, o0 = {}, e1 = {}, o1 = {}, e2 = {}, o2 = {}, e3 = {}, o3 = {};
            const double* p0 = P.rows + m0 * d;
            const double* p1 = P.rows + (m0 + (nb > 1 ? 1 : 0)) * d;
            const double* p2 = P.rows + (m0 + (nb > 2 ? 2 : 0)) * d;
            const double* p3 = P.rows + (m0 + (nb > 3 ? 3 : 0)) * d;
            int64_t l = 0;
            for (; l + 2 <= d; l += 2) {
                const V a = load<W>(xt + l * W), b = load<W>(xt + (l + 1) * W);
                e0 += a * p0[l], o0 += b * p0[l + 1];
                e1 += a * p1[l], o1 += b * p1[l + 1];
                e2 += a * p2[l], o2 += b * p2[l + 1];
                e3 += a * p3[l], o3 += b * p3[l + 1];
            }
            if (l < d) {
                const V a = load<W>(xt + l * W);
                e0 += a * p0[l], e1 += a * p1[l], e2 += a * p2[l], e3 += a * p3[l];
            }
            dots[0] = e0 + o0, dots[1] = e1 + o1, dots[2] = e2 + o2, dots[3] = e3 + o3;
        }
        for (int b = 0; b < nb; ++b) {
            const int64_t m = m0 + b;
            const V dist = (sq + P.sqnorm[m]) - 2.0 * dots[b];
            V k = -gamma * (dist > 0.0 ? dist : V{});
            exp_nonpositive<W>(&k);
            const double* vm = P.chol + m * P.kk;
            V r0 = {}, r1 = {}, r2 = {}, r3 = {};
            int64_t q = 0;
            for (; q + 4 <= m; q += 4) {
                r0 += load<W>(ct + q * W) * vm[q];
                r1 += load<W>(ct + (q + 1) * W) * vm[q + 1];
                r2 += load<W>(ct + (q + 2) * W) * vm[q + 2];
                r3 += load<W>(ct + (q + 3) * W) * vm[q + 3];
            }
            if (q < m) r0 += load<W>(ct + q * W) * vm[q];
            if (q + 1 < m) r1 += load<W>(ct + (q + 1) * W) * vm[q + 1];
            if (q + 2 < m) r2 += load<W>(ct + (q + 2) * W) * vm[q + 2];
            const V e = (k - ((r0 + r1) + (r2 + r3))) / P.diag[m];
            const auto behind = from <= static_cast<double>(m);  // lanes that have not seen pick m yet
            store<W>(ct + m * W, behind ? e : load<W>(ct + m * W));
            d2 = behind ? d2 - e * e : d2;
        }
    }
    for (int w = 0; w < g.lanes; ++w) {
        for (int64_t q = g.from[w]; q < to; ++q) g.chol[w][q] = ct[q * W + w];
        *g.d2[w] = d2[w];
    }
}

}  // namespace kernels

// The entry points for one element type, bound to the best variant for this CPU.
template <typename T>
struct Kernels {
    using Update = void (*)(const CandidateGroup<T>&, int64_t, const PicksView&, double, double*);
    using Sqnorm = void (*)(const T* const*, int, int64_t, double*, double*);
    using Exp = void (*)(const double*, double*, int64_t);
    Update update;  // group_update for groups of up to `lanes` candidates
    Sqnorm sqnorm;  // group_sqnorm for groups of up to `lanes` rows
    Exp exp;        // exp_nonpositive over an array (for testing it against numpy.exp)
    int lanes;
    const char* name;
};

#define TR_DPP_KERNEL_VARIANT(NAME, TARGET, W)                                                                  \
    template <typename T>                                                                                       \
    TARGET void update_##NAME(const CandidateGroup<T>& g, int64_t to, const PicksView& P, double gamma,         \
                              double* scratch) {                                                                \
        kernels::group_update<T, W>(g, to, P, gamma, scratch);                                                  \
    }                                                                                                           \
    template <typename T>                                                                                       \
    TARGET void sqnorm_##NAME(const T* const* rows, int lanes, int64_t d, double* xt, double* out) {            \
        kernels::group_sqnorm<T, W>(rows, lanes, d, xt, out);                                                   \
    }                                                                                                           \
    TARGET inline void exp_##NAME(const double* x, double* out, int64_t n) {                                    \
        for (int64_t i = 0; i < n; i += W) {                                                                    \
            typename kernels::Vec<W>::type v = {};                                                              \
            const int64_t m = n - i < W ? n - i : W;                                                            \
            __builtin_memcpy(&v, x + i, m * sizeof(double));                                                    \
            kernels::exp_nonpositive<W>(&v);                                                                    \
            __builtin_memcpy(out + i, &v, m * sizeof(double));                                                  \
        }                                                                                                       \
    }

TR_DPP_KERNEL_VARIANT(baseline, , 2)  // SSE2 on x86-64, NEON on arm64
#if defined(__x86_64__) && defined(__GNUC__)
TR_DPP_KERNEL_VARIANT(avx2, __attribute__((target("avx2,fma"))), 4)
TR_DPP_KERNEL_VARIANT(avx512, __attribute__((target("avx512f"))), 8)
#endif
#undef TR_DPP_KERNEL_VARIANT

// Variants this CPU can run, widest first.
inline std::vector<std::string> supported_variants() {
    std::vector<std::string> names;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) names.push_back("avx512");
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) names.push_back("avx2");
#endif
    names.push_back("baseline");
    return names;
}

// The kernels of a variant returned by supported_variants().
template <typename T>
Kernels<T> kernels_named(const std::string& name) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (name == "avx512") return {&update_avx512<T>, &sqnorm_avx512<T>, &exp_avx512, 8, "avx512"};
    if (name == "avx2") return {&update_avx2<T>, &sqnorm_avx2<T>, &exp_avx2, 4, "avx2"};
#endif
    (void)name;
    return {&update_baseline<T>, &sqnorm_baseline<T>, &exp_baseline, 2, "baseline"};
}

}  // namespace trustrepair
