// The arithmetic of the greedy DPP selector: bringing candidates up to date with new picks, compiled for
// the widest SIMD the running CPU has (AVX-512: W = 8 doubles per vector, AVX2 + FMA: W = 4, baseline:
// W = 2) and chosen once when a selection starts.
//
// A candidate i with embedding row x (float32 or float64), Cholesky row c[0:from] and Schur complement d2
// is brought up to date with picks m = from..to-1 (see dpp_greedy.cpp):
//
//     K_m = exp(-gamma * max((||x||^2 + ||p_m||^2) - 2 <x, p_m>, 0))
//     e_m = (K_m - <V[m, 0:m], c[0:m]>) / V[m, m],    c[m] = e_m,    d2 -= e_m^2
//
// all in float64 (float32 rows are widened exactly). The dot products <x, p_m> (2 d flops per kernel
// entry, most of the work) are vectorised over the embedding, one candidate against up to kMaxPicks picks
// per call; the recurrence (2 m flops per entry) runs one candidate per lane, W candidates at a time.
// Every value is computed by the same operations in the same order, whatever the group, lane, thread or
// batch of picks and whether the greedy is lazy or eager: a dot product over the embedding is
// (lane-wise sum over even chunks of W) + (over odd chunks), each in increasing order, then its lanes are
// added by a fixed tree (lane_sum); the sum over q in the recurrence is
// ((q = 0 mod 4) + (1 mod 4)) + ((2 mod 4) + (3 mod 4)), each in increasing q. So a candidate's values
// never depend on how the work was split; they can differ in the last bits between CPUs that run
// different variants (the vector width changes the order of the sums).
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
    int64_t d, dp, kk;     // dp = padded_width(d), the stride of rows
    const double* rows;    // (kk, dp) embeddings of the picks, widened to float64, zero-padded
    const double* sqnorm;  // (kk,)   ||p_m||^2
    const double* chol;    // (kk, kk) row m holds V[m, 0:m] = c_{j_m}[0:m]
    const double* diag;    // (kk,)   V[m, m] = sqrt(d2_{j_m}) at selection
};

constexpr int kMaxLanes = 8;

// Row width in doubles once padded with zeros to a multiple of kMaxLanes (so that every variant's vectors
// tile it; the zeros add exact zeros to every dot product).
inline int64_t padded_width(int64_t d) { return (d + kMaxLanes - 1) / kMaxLanes * kMaxLanes; }

// Up to kMaxLanes candidates updated together; lanes beyond `lanes` are idle.
template <typename T>
struct CandidateGroup {
    int lanes = 0;
    const T* row[kMaxLanes];    // (d,) embedding rows
    double* chol[kMaxLanes];    // (kk,) Cholesky rows, valid on [0, from)
    double* d2[kMaxLanes];      // Schur complements
    double* sq[kMaxLanes];      // ||x||^2, written when from = 0, read after
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

// Picks per call of pick_dots: enough independent accumulator chains to hide the FMA latency (two per
// pick), without spilling registers (32 vector registers with AVX-512, 16 otherwise).
template <int W>
constexpr int kMaxPicks = W >= 8 ? 8 : 4;

// out[0..d) = row widened to float64, out[d..dp) = 0 (dp = padded_width(d)).
template <typename T, int W>
__attribute__((always_inline)) inline void widen_row(const T* row, int64_t d, int64_t dp, double* out) {
    int64_t l = 0;
    for (; l + W <= d; l += W) store<W>(out + l, load_widened<T, W>(row + l));
    for (; l < d; ++l) out[l] = static_cast<double>(row[l]);
    for (; l < dp; ++l) out[l] = 0.0;
}

// Sum of the W lanes of v as a fixed tree (halves added lane by lane, then their halves, ...):
// ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)) for W = 8.
template <int W>
__attribute__((always_inline)) inline double lane_sum(typename Vec<W>::type v) {
    double a[W];
    __builtin_memcpy(a, &v, sizeof(a));
    for (int h = W / 2; h >= 1; h /= 2)
        for (int l = 0; l < h; ++l) a[l] += a[l + h];
    return a[0];
}

// out[b] = lane_sum(v[b]) for b < P. For W = 8 the eight trees run side by side: each level adds, for
// every vector, lane l to lane l + h exactly as lane_sum does (shuffles only regroup the halves of two
// vectors into one), so out[b] is bit for bit lane_sum(v[b]).
template <int W, int P>
__attribute__((always_inline)) inline void lane_sums(const typename Vec<W>::type* v, double* out) {
    typedef typename Vec<W>::type V;
    typedef typename Vec<W>::index I;
    if constexpr (W == 8 && P >= 4) {
        V r[8];
        for (int b = 0; b < 8; ++b) r[b] = b < P ? v[b] : V{};
        V s[4], q[2];
        for (int b = 0; b < 4; ++b)  // s[b] = (r[2b] lanes 0-3 + 4-7, r[2b+1] lanes 0-3 + 4-7)
            s[b] = __builtin_shuffle(r[2 * b], r[2 * b + 1], I{0, 1, 2, 3, 8, 9, 10, 11}) +
                   __builtin_shuffle(r[2 * b], r[2 * b + 1], I{4, 5, 6, 7, 12, 13, 14, 15});
        for (int b = 0; b < 2; ++b)  // q[b] lanes: (4b, 4b+2, 4b+1, 4b+3) x (lane 0, 1)
            q[b] = __builtin_shuffle(s[2 * b], s[2 * b + 1], I{0, 1, 8, 9, 4, 5, 12, 13}) +
                   __builtin_shuffle(s[2 * b], s[2 * b + 1], I{2, 3, 10, 11, 6, 7, 14, 15});
        const V sum = __builtin_shuffle(q[0], q[1], I{0, 2, 4, 6, 8, 10, 12, 14}) +
                      __builtin_shuffle(q[0], q[1], I{1, 3, 5, 7, 9, 11, 13, 15});
        constexpr int kOrder[8] = {0, 2, 1, 3, 4, 6, 5, 7};  // vector behind each lane of sum
        for (int l = 0; l < 8; ++l)
            if (kOrder[l] < P) out[kOrder[l]] = sum[l];
    } else {
        for (int b = 0; b < P; ++b) out[b] = lane_sum<W>(v[b]);
    }
}

// out[b] = <x, p + b * dp> for b < P, over dp doubles (a multiple of W). Every dot product is computed
// the same way, whatever P and whichever b: lane l of two accumulators sums x[c W + l] * p[c W + l] over
// the even and the odd chunks c respectively, in increasing c (one FMA each); then the two are added and
// the lanes summed by lane_sum's tree. So <x, x> equals <x, y> bit for bit when x and y hold the same
// values, and identical rows are exactly 0 apart.
template <int W, int P>
__attribute__((always_inline)) inline void pick_dots(const double* x, const double* p, int64_t dp, double* out) {
    typedef typename Vec<W>::type V;
    V even[P], odd[P];
    for (int b = 0; b < P; ++b) even[b] = odd[b] = V{};
    int64_t l = 0;
    for (; l + 2 * W <= dp; l += 2 * W) {
        const V a = load<W>(x + l), c = load<W>(x + l + W);
        for (int b = 0; b < P; ++b) {
            even[b] += a * load<W>(p + b * dp + l);
            odd[b] += c * load<W>(p + b * dp + l + W);
        }
    }
    if (l < dp) {
        const V a = load<W>(x + l);
        for (int b = 0; b < P; ++b) even[b] += a * load<W>(p + b * dp + l);
    }
    V sum[P];
    for (int b = 0; b < P; ++b) sum[b] = even[b] + odd[b];
    lane_sums<W, P>(sum, out);
}

// pick_dots for a run-time count 1 <= count <= kMaxPicks<W>.
template <int W>
__attribute__((always_inline)) inline void pick_dots_n(const double* x, const double* p, int64_t dp, int count,
                                                       double* out) {
    switch (count) {
        case 1: return pick_dots<W, 1>(x, p, dp, out);
        case 2: return pick_dots<W, 2>(x, p, dp, out);
        case 3: return pick_dots<W, 3>(x, p, dp, out);
        case 4: return pick_dots<W, 4>(x, p, dp, out);
    }
    if constexpr (kMaxPicks<W> == 8) {
        switch (count) {
            case 5: return pick_dots<W, 5>(x, p, dp, out);
            case 6: return pick_dots<W, 6>(x, p, dp, out);
            case 7: return pick_dots<W, 7>(x, p, dp, out);
            default: return pick_dots<W, 8>(x, p, dp, out);
        }
    }
}

// ||x||^2 of one embedding row, as pick_dots computes <x, x>. scratch holds dp doubles.
template <typename T, int W>
__attribute__((always_inline)) inline double row_sqnorm(const T* row, int64_t d, int64_t dp, double* scratch) {
    widen_row<T, W>(row, d, dp, scratch);
    double out;
    pick_dots<W, 1>(scratch, scratch, dp, &out);
    return out;
}

// The update described at the top of this file for a group of candidates, in two phases.
//   1. Distances, candidate by candidate: the row is widened once into scratch, then its dot products
//      with exactly the picks it has not seen are computed kMaxPicks<W> at a time (pick_dots, vectorised
//      over the embedding: no transposes, each pick row reused from L1 by the next candidates of the
//      group). A row seen for the first time (from = 0) also gets its squared norm, kept in *sq.
//   2. Kernel values and the recurrence, one candidate per lane, one pick at a time (it is sequential in
//      m). Lane w takes part in pick m only when from[w] <= m; otherwise its c[m] is already known and kept.
// scratch holds dp + 2 kk W + kMaxPicks<W> doubles (P.dp = padded_width(d)).
template <typename T, int W>
__attribute__((always_inline)) inline void group_update(const CandidateGroup<T>& g, int64_t to, const PicksView& P,
                                                        double gamma, double* scratch) {
    typedef typename Vec<W>::type V;
    const int64_t dp = P.dp;
    double* x = scratch;             // (dp,) the widened row
    double* dots = x + dp;           // (kk, W) <x_w, p_m>, lane-major
    double* ct = dots + P.kk * W;    // (kk, W) Cholesky rows, transposed
    double* tmp = ct + P.kk * W;     // (kMaxPicks,)
    int64_t lo = to;
    for (int w = 0; w < g.lanes; ++w) lo = g.from[w] < lo ? g.from[w] : lo;
    for (int w = 0; w < W; ++w) {
        if (w >= g.lanes) {
            for (int64_t m = lo; m < to; ++m) dots[m * W + w] = 0.0;
            continue;
        }
        widen_row<T, W>(g.row[w], P.d, dp, x);
        if (g.from[w] == 0) pick_dots<W, 1>(x, x, dp, g.sq[w]);
        for (int64_t m = lo; m < g.from[w]; ++m) dots[m * W + w] = 0.0;
        for (int64_t m = g.from[w]; m < to; m += kMaxPicks<W>) {
            const int count = to - m < kMaxPicks<W> ? static_cast<int>(to - m) : kMaxPicks<W>;
            pick_dots_n<W>(x, P.rows + m * dp, dp, count, tmp);
            for (int b = 0; b < count; ++b) dots[(m + b) * W + w] = tmp[b];
        }
    }
    V sq, d2, from;
    for (int w = 0; w < W; ++w) {
        const int src = w < g.lanes ? w : 0;
        sq[w] = *g.sq[src];
        d2[w] = *g.d2[src];
        from[w] = static_cast<double>(g.from[src]);
        for (int64_t q = 0; q < g.from[src]; ++q) ct[q * W + w] = g.chol[src][q];
    }
    for (int64_t m = lo; m < to; ++m) {
        const V dist = (sq + P.sqnorm[m]) - 2.0 * load<W>(dots + m * W);
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
    using Sqnorm = double (*)(const T*, int64_t, int64_t, double*);
    using Exp = void (*)(const double*, double*, int64_t);
    Update update;  // group_update for groups of up to `lanes` candidates
    Sqnorm sqnorm;  // row_sqnorm
    Exp exp;        // exp_nonpositive over an array (for testing it against numpy.exp)
    int lanes;  // W, the candidates per group_update call
    const char* name;
};

#define TR_DPP_KERNEL_VARIANT(NAME, TARGET, W)                                                                  \
    template <typename T>                                                                                       \
    TARGET void update_##NAME(const CandidateGroup<T>& g, int64_t to, const PicksView& P, double gamma,         \
                              double* scratch) {                                                                \
        kernels::group_update<T, W>(g, to, P, gamma, scratch);                                                  \
    }                                                                                                           \
    template <typename T>                                                                                       \
    TARGET double sqnorm_##NAME(const T* row, int64_t d, int64_t dp, double* scratch) {                        \
        return kernels::row_sqnorm<T, W>(row, d, dp, scratch);                                                  \
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

// Doubles of scratch one thread needs for group_update and row_sqnorm with `lanes` = W.
inline int64_t scratch_doubles(int64_t d, int64_t kk, int lanes) {
    return padded_width(d) + 2 * kk * lanes + kMaxLanes;
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
