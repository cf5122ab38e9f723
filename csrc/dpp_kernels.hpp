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
// all in float64 (float32 rows are widened exactly). Candidates come in groups of kGroup = 8 rows that
// have seen the same picks. The dot products <x, p_m> (2 d flops per kernel entry, most of the work) are
// register-blocked: up to 8 candidates against up to 4 picks per call (block_dots), vectorised over the
// embedding, so each pick chunk is loaded once per block and each candidate chunk once per pick block; the
// recurrence (2 m flops per entry) runs one candidate per lane, W candidates at a time.
// Every value is computed by the same operations in the same order, whatever the block, group, lane,
// thread or batch of picks and whether the greedy is lazy or eager: a dot product over the embedding is a
// lane-wise sum over the chunks of W in increasing order, then its lanes are added by a fixed tree
// (lane_sum); the sum over q in the recurrence is ((q = 0 mod 4) + (1 mod 4)) + ((2 mod 4) + (3 mod 4)),
// each in increasing q. So a candidate's values never depend on how the work was split; they can differ
// in the last bits between CPUs that run different variants (the vector width changes the order of the
// sums).
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

// Candidates are updated in groups of kGroup consecutive rows that are always brought up to date together,
// so that they share the picks they have seen and their distances are small blocked matrix products.
constexpr int kGroup = 8;

// A group's state, as stored by the greedy (lane w = candidate first + w of the group).
template <typename T>
struct CandidateGroup {
    const T* row[kGroup];  // (d,) embedding rows; rows past N point to a row of zeros
    double* chol;          // (kk, kGroup) the Cholesky rows, lane-major: chol[q * kGroup + w] = c_w[q]
    double* d2;            // (kGroup,) Schur complements
    double* sq;            // (kGroup,) ||x_w||^2, written when from = 0, read after
    int64_t from;          // picks every row of the group is up to date with
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
#if defined(__x86_64__) && defined(__GNUC__)
    } else if constexpr (W == 8) {
        // One AVX-512 conversion from memory. GCC 12 lowers __builtin_convertvector of 8 floats to two
        // 4-wide conversions and a shuffle (4 instructions), which slowed the float32 dot products by half.
        // Only ever inlined into the avx512 variant.
        typename Vec<W>::type v;
        __asm__("vcvtps2pd %1, %0" : "=v"(v) : "m"(*reinterpret_cast<const typename Vec<W>::narrow*>(p)));
        return v;
#endif
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

// Picks per call of block_dots, and the accumulators a call may hold (one per candidate and pick): enough
// independent chains to hide the FMA latency (at least 8), without spilling registers (32 vector registers
// with AVX-512, 16 otherwise).
template <int W>
constexpr int kMaxPicks = W >= 8 ? 4 : 2;
template <int W>
constexpr int kAccumulators = W >= 8 ? 16 : 8;

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

// out[b] = lane_sum(v[b]) for b < N. For W = 8 the trees of up to eight vectors run side by side: each level
// adds, for every vector, lane l to lane l + h exactly as lane_sum does (shuffles only regroup the halves of
// two vectors into one), so out[b] is bit for bit lane_sum(v[b]).
template <int W, int N>
__attribute__((always_inline)) inline void lane_sums(const typename Vec<W>::type* v, double* out) {
    typedef typename Vec<W>::type V;
    typedef typename Vec<W>::index I;
    if constexpr (N > 8) {
        lane_sums<W, 8>(v, out);
        lane_sums<W, N - 8>(v + 8, out + 8);
    } else if constexpr (W == 8 && N >= 4) {
        V r[8];
        for (int b = 0; b < 8; ++b) r[b] = b < N ? v[b] : V{};
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
            if (kOrder[l] < N) out[kOrder[l]] = sum[l];
    } else {
        for (int b = 0; b < N; ++b) out[b] = lane_sum<W>(v[b]);
    }
}

// out[b * stride + r] = <x[r], p + b dp> for r < R, b < P: R candidate rows of dp elements of type S
// (embedding rows as stored when d = dp, or rows widened to float64 and zero-padded) against P pick rows,
// float64 zero-padded to dp, register-blocked so that each chunk of W elements of a pick row is loaded
// once for R candidates and each chunk of a candidate row once for P picks. Every dot product is computed
// the same way, whatever S, R, P, r and b: lane l of one accumulator sums x[c W + l] * p[c W + l] over the
// chunks c in increasing order (one FMA each), then the lanes are summed by lane_sum's tree. So <x, x>
// equals <x, y> bit for bit when y holds x's values, and identical rows are exactly 0 apart. (A branch for
// a partial last chunk inside the loop made GCC keep the accumulators in memory, at half the speed.)
template <typename S, int W, int R, int P>
__attribute__((always_inline)) inline void block_dots(const S* const* x, const double* p, int64_t dp, double* out,
                                                      int stride) {
    typedef typename Vec<W>::type V;
    V acc[R * P];
    for (int a = 0; a < R * P; ++a) acc[a] = V{};
    for (int64_t l = 0; l < dp; l += W) {
        V pick[P];
        for (int b = 0; b < P; ++b) pick[b] = load<W>(p + b * dp + l);
        for (int r = 0; r < R; ++r) {
            const V a = load_widened<S, W>(x[r] + l);
            for (int b = 0; b < P; ++b) acc[r * P + b] += a * pick[b];
        }
    }
    double sums[R * P];
    lane_sums<W, R * P>(acc, sums);
    for (int r = 0; r < R; ++r)
        for (int b = 0; b < P; ++b) out[b * stride + r] = sums[r * P + b];
}

// out[b * kGroup + w] = <x[w], p + b dp> for the kGroup rows of a group and P <= kMaxPicks<W> picks:
// blocks of as many candidates as the accumulators allow.
template <typename S, int W, int P>
__attribute__((always_inline)) inline void group_dots(const S* const* x, const double* p, int64_t dp, double* out) {
    constexpr int R = kAccumulators<W> / P >= kGroup ? kGroup : kAccumulators<W> / P >= 4 ? 4 : 2;
    for (int r = 0; r < kGroup; r += R) block_dots<S, W, R, P>(x + r, p, dp, out + r, kGroup);
}

// group_dots for a run-time count 1 <= count <= kMaxPicks<W>.
template <typename S, int W>
__attribute__((always_inline)) inline void group_dots_n(const S* const* x, const double* p, int64_t dp, int count,
                                                        double* out) {
    switch (count) {
        case 1: return group_dots<S, W, 1>(x, p, dp, out);
        case 2: return group_dots<S, W, 2>(x, p, dp, out);
    }
    if constexpr (kMaxPicks<W> == 4) {
        switch (count) {
            case 3: return group_dots<S, W, 3>(x, p, dp, out);
            default: return group_dots<S, W, 4>(x, p, dp, out);
        }
    }
}

// out[r] = ||x[r]||^2 for r < R rows of dp elements, bit for bit as block_dots computes <x[r], y> for a
// y holding x[r]'s values, with R accumulator chains.
template <typename S, int W, int R>
__attribute__((always_inline)) inline void block_sqnorms(const S* const* x, int64_t dp, double* out) {
    typedef typename Vec<W>::type V;
    V acc[R];
    for (int r = 0; r < R; ++r) acc[r] = V{};
    for (int64_t l = 0; l < dp; l += W)
        for (int r = 0; r < R; ++r) {
            const V a = load_widened<S, W>(x[r] + l);
            acc[r] += a * a;
        }
    lane_sums<W, R>(acc, out);
}

// ||x||^2 of one embedding row, as group_update computes it. scratch holds dp doubles.
template <typename T, int W>
__attribute__((always_inline)) inline double row_sqnorm(const T* row, int64_t d, int64_t dp, double* scratch) {
    widen_row<T, W>(row, d, dp, scratch);
    const double* widened = scratch;
    double out;
    block_sqnorms<double, W, 1>(&widened, dp, &out);
    return out;
}

// Phase 1 of group_update for rows x of dp elements (see there).
template <typename S, int W>
__attribute__((always_inline)) inline void group_distances(const S* const* x, int64_t from, int64_t to,
                                                           const PicksView& P, double* sq, double* dots) {
    if (from == 0) block_sqnorms<S, W, kGroup>(x, P.dp, sq);
    for (int64_t m = from; m < to; m += kMaxPicks<W>) {
        const int count = to - m < kMaxPicks<W> ? static_cast<int>(to - m) : kMaxPicks<W>;
        group_dots_n<S, W>(x, P.rows + m * P.dp, P.dp, count, dots + m * kGroup);
    }
}

// The update described at the top of this file for the kGroup candidates of a group, all up to date with
// the same picks (g.from), in two phases.
//   1. Distances: the dot products of the group's rows with the picks from..to-1, kMaxPicks<W> picks at a
//      time (group_dots; the pick rows come from L1 or L2). With at most kMaxPicks<W> picks and d a
//      multiple of 8, each row is read once as stored (float32 widened in registers); otherwise the rows
//      are first widened and zero-padded into scratch (once instead of once per block of picks; 16 KB of
//      stores for d = 256, which cost more than the products for a single pick). A group seen for the
//      first time (from = 0) also gets its rows' squared norms.
//   2. Kernel values and the recurrence, one candidate per lane, W lanes at a time, one pick at a time (it
//      is sequential in m), on the group's lane-major Cholesky rows.
// scratch holds kk kGroup + kGroup dp doubles (P.dp = padded_width(d)), aligned to W.
template <typename T, int W>
__attribute__((always_inline)) inline void group_update(const CandidateGroup<T>& g, int64_t to, const PicksView& P,
                                                        double gamma, double* scratch) {
    typedef typename Vec<W>::type V;
    const int64_t dp = P.dp, from = g.from;
    double* dots = scratch;                  // (kk, kGroup) <x_w, p_m>
    double* widened = dots + P.kk * kGroup;  // (kGroup, dp)
    if (to - from <= kMaxPicks<W> && P.d == dp) {
        group_distances<T, W>(g.row, from, to, P, g.sq, dots);
    } else {
        const double* rows[kGroup];
        for (int w = 0; w < kGroup; ++w) {
            widen_row<T, W>(g.row[w], P.d, dp, widened + w * dp);
            rows[w] = widened + w * dp;
        }
        group_distances<double, W>(rows, from, to, P, g.sq, dots);
    }
    for (int h = 0; h < kGroup; h += W) {
        const V sq = load<W>(g.sq + h);
        V d2 = load<W>(g.d2 + h);
        for (int64_t m = from; m < to; ++m) {
            const V dist = (sq + P.sqnorm[m]) - 2.0 * load<W>(dots + m * kGroup + h);
            V k = -gamma * (dist > 0.0 ? dist : V{});
            exp_nonpositive<W>(&k);
            const double* vm = P.chol + m * P.kk;
            const double* c = g.chol + h;
            V r0 = {}, r1 = {}, r2 = {}, r3 = {};
            int64_t q = 0;
            for (; q + 4 <= m; q += 4) {
                r0 += load<W>(c + q * kGroup) * vm[q];
                r1 += load<W>(c + (q + 1) * kGroup) * vm[q + 1];
                r2 += load<W>(c + (q + 2) * kGroup) * vm[q + 2];
                r3 += load<W>(c + (q + 3) * kGroup) * vm[q + 3];
            }
            if (q < m) r0 += load<W>(c + q * kGroup) * vm[q];
            if (q + 1 < m) r1 += load<W>(c + (q + 1) * kGroup) * vm[q + 1];
            if (q + 2 < m) r2 += load<W>(c + (q + 2) * kGroup) * vm[q + 2];
            const V e = (k - ((r0 + r1) + (r2 + r3))) / P.diag[m];
            store<W>(g.chol + m * kGroup + h, e);
            d2 -= e * e;
        }
        store<W>(g.d2 + h, d2);
    }
}
}  // namespace kernels

// The entry points for one element type, bound to the best variant for this CPU.
template <typename T>
struct Kernels {
    using Update = void (*)(const CandidateGroup<T>&, int64_t, const PicksView&, double, double*);
    using Sqnorm = double (*)(const T*, int64_t, int64_t, double*);
    using Exp = void (*)(const double*, double*, int64_t);
    Update update;  // group_update
    Sqnorm sqnorm;  // ||x||^2 of one row, as group_update computes it
    Exp exp;        // exp_nonpositive over an array (for testing it against numpy.exp)
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

// Doubles of scratch one thread needs for group_update and row_sqnorm.
inline int64_t scratch_doubles(int64_t d, int64_t kk) { return kGroup * padded_width(d) + kk * kGroup; }

// The kernels of a variant returned by supported_variants().
template <typename T>
Kernels<T> kernels_named(const std::string& name) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (name == "avx512") return {&update_avx512<T>, &sqnorm_avx512<T>, &exp_avx512, "avx512"};
    if (name == "avx2") return {&update_avx2<T>, &sqnorm_avx2<T>, &exp_avx2, "avx2"};
#endif
    (void)name;
    return {&update_baseline<T>, &sqnorm_baseline<T>, &exp_baseline, "baseline"};
}

}  // namespace trustrepair
