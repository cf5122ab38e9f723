// Greedy log-det DPP selection with incremental Cholesky updates and lazy evaluation.
//
// Objective (paper Eq. 7), over subsets S of the n rows with |S| <= k:
//
//     f(S) = log det(L_S) + eta * log(sum_{i in S} s_i),   L = K + I,  K_ij = exp(-gamma ||e_i - e_j||^2).
//
// Incremental Cholesky (Chen, Zhang & Zhou, NeurIPS 2018). With S = (j_0, ..., j_{t-1}) and
// L_S = V V^T, every candidate i keeps its Cholesky row c_i = V^{-1} L_{S,i} and its Schur complement
// d2_i = L_ii - ||c_i||^2, so that log det(L_{S+i}) - log det(L_S) = log d2_i. Adding pick j_m extends
// each candidate by one entry:
//
//     e_i = (L_{j_m, i} - <c_{j_m}[0:m], c_i[0:m]>) / sqrt(d2_{j_m}),   c_i[m] = e_i,   d2_i -= e_i^2.
//
// Only kernel values against picks are ever formed (one per candidate and pick, each a d-dimensional
// distance), never the n x n kernel: memory is O(n k) for the c_i rows. Because L = K + I with K
// positive semidefinite, every Schur complement is >= 1 in exact arithmetic, so the divisions are by
// numbers >= 1 and need no pivoting or residual tolerance.
//
// Marginal gain of candidate i given S_t (t picks, score total T_t = sum_{m<t} s_{j_m}):
//     t = 0:  g_i = log(1 + K_ii) + eta * log(s_i)          (= log 2 + eta log s_i; f(empty) = -inf)
//     t >= 1: g_i = log(d2_i) + eta * log1p(s_i / T_t)
// with the score term dropped entirely when eta = 0. The pick is the largest g_i, ties to the lowest
// index. Stopping rule: from the second pick on, the greedy stops before k picks when the best gain is
// not > 0 (possible only when rounding has brought a residual d2_i - 1 to <= 0 and the candidate adds
// no score); it always stops after min(k, n) picks.
//
// Lazy evaluation (Minoux's accelerated greedy). From t >= 1 on, d2_i never increases (each update
// subtracts e_i^2 >= 0) and T_t never decreases, so a gain computed at an earlier step is an upper bound
// on the current one. Rounding keeps this: IEEE subtraction, addition, division and multiplication are
// monotone, and the libm log and log1p are taken to be monotone (they are within an ulp of correctly
// rounded); the tests check lazy against eager picks. The bounds live in three tiers, cheapest first:
//   * pending: candidates never updated since the first pick, bound log 2 + eta log1p(s_i / T_t), kept
//     in a heap by (s desc, index asc), whose top therefore has the largest such bound; a candidate moves
//     to the main heap once its bound reaches the main heap's top key (ties included);
//   * a bound whose score term is older than T_t is first re-keyed with the current score term (no
//     kernel entries);
//   * otherwise the candidate is updated against the picks it has not seen (kernel entries), which gives
//     its exact gain.
// The main heap (lazy_heap.hpp) is ordered by key, then lowest index. When its top is exact it is the
// greedy pick, tie-break included: every other candidate's gain is <= its bound <= the top's gain, with
// equal values ordered by index. Otherwise the stale entries ranked above the best exact one are
// processed in batches (8, doubling to 1024 within a step) and re-sorted in place; the candidates to
// update are sorted by how many picks they have seen and updated a SIMD group at a time (dpp_kernels.hpp:
// a group of similar stamps reads the same pick rows, which stay in L1 between its candidates). The first pick's
// gains contain eta log s_i, which bounds nothing later because the score term then starts from log(0):
// the heap is built only after the first pick. The eager mode (lazy=false) updates every candidate at
// every step. A candidate's values never depend on its group, lane or thread (each lane runs the same
// operations in the same order), so both modes return the same picks with bit-identical gains.
//
// Threads: one OpenMP parallel region spans the selection; its thread 0 runs the greedy and the others
// help with each batch of candidate updates through batch_pool.hpp. Results do not depend on the thread
// count.
//
// Precision: embeddings are read in their own dtype (float32 or float64); every distance, kernel value,
// Cholesky entry and gain is float64. Distances use ||e_i||^2 + ||e_j||^2 - 2 <e_i, e_j>, clamped at 0
// (identical rows give exactly 0: norms and dot products are summed in the same order).
#include "dpp_greedy.hpp"
#include "batch_pool.hpp"
#include "dpp_kernels.hpp"
#include "lazy_heap.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <stdexcept>
#include <memory>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace trustrepair {
namespace {

// Lazy batches: the stale candidates at the top of the heap are updated kFirstBatch at a time, doubling
// (up to kMaxBatch) while a step keeps needing more; neither the batch sizes nor the thread count
// change the picks, only how much work is done in parallel.
constexpr size_t kFirstBatch = 8;
constexpr size_t kMaxBatch = 1024;
constexpr int64_t kParallelEntries = 64;  // batches with fewer kernel entries run on the greedy's thread
constexpr int64_t kRowsPerItem = 512;  // candidates per work item in the eager greedy's passes

// n doubles starting on a 64-byte boundary (a cache line), zero-initialised. With rows padded to
// multiples of 8 doubles, every AVX-512 load of a row then touches one cache line, not two: unaligned
// rows made the dot products run at half speed.
class AlignedDoubles {
  public:
    explicit AlignedDoubles(size_t n) : storage_(n + kLineDoubles, 0.0) {
        const auto address = reinterpret_cast<uintptr_t>(storage_.data());
        data_ = storage_.data() + (kLineDoubles - address / sizeof(double) % kLineDoubles) % kLineDoubles;
    }
    AlignedDoubles(const AlignedDoubles&) = delete;
    AlignedDoubles& operator=(const AlignedDoubles&) = delete;
    double* data() { return data_; }
    const double* data() const { return data_; }
    double& operator[](size_t i) { return data_[i]; }

  private:
    static constexpr size_t kLineDoubles = 64 / sizeof(double);
    std::vector<double> storage_;
    double* data_;
};

// The selected set, read-only while candidates are updated (PicksView points into it).
struct Picks {
    int64_t d, dp, kk;
    AlignedDoubles rows;         // (kk, dp) embeddings of the picks, widened to float64, zero-padded
    std::vector<double> sqnorm;  // (kk,)   ||e_{j_m}||^2
    std::vector<double> chol;    // (kk, kk) row m holds c_{j_m}[0:m] (lower-triangular V)
    std::vector<double> diag;    // (kk,)   sqrt(d2_{j_m}) at selection = V[m, m]
    Picks(int64_t d_, int64_t kk_)
        : d(d_), dp(padded_width(d_)), kk(kk_), rows(kk_ * dp), sqnorm(kk_), chol(kk_ * kk_), diag(kk_) {}
    PicksView view() const { return {d, dp, kk, rows.data(), sqnorm.data(), chol.data(), diag.data()}; }
};

int resolve_threads(int requested) {
#ifdef _OPENMP
    return requested > 0 ? requested : omp_get_max_threads();
#else
    (void)requested;
    return 1;
#endif
}

int thread_id() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

template <typename T>
class Greedy {
  public:
    Greedy(const T* emb, const double* s, int64_t n, int64_t d, int64_t kk, double eta, double gamma,
           int threads, BatchPool& pool)
        : emb_(emb), s_(s), n_(n), d_(d), kk_(kk), eta_(eta), gamma_(gamma), pool_(pool),
          kernels_(kernels_named<T>(simd_variant())), lanes_(kernels_.lanes), picks_(d, kk),
          chol_(new double[n * kk]), d2_(n, 2.0), logd2_(n, std::log(2.0)), sq_(n), stamp_(n, 0), taken_(n, 0),
          scratch_per_thread_(padded_width(scratch_doubles(d, kk, lanes_))),
          scratch_(static_cast<size_t>(threads) * scratch_per_thread_) {}

    GreedyResult run(bool lazy) {
        // First pick: every candidate has d2_i = L_ii = 1 + K_ii = 2, so only the score term differs.
        int64_t first = 0;
        double best = -HUGE_VAL;
        for (int64_t i = 0; i < n_; ++i) {
            const double g = logd2_[i] + (eta_ > 0.0 ? eta_ * std::log(s_[i]) : 0.0);
            if (g > best) best = g, first = i;
        }
        commit(first, best);  // finite: when eta > 0 some s_i > 0 (checked by the caller)
        if (lazy)
            run_lazy();
        else
            run_eager();
        return std::move(out_);
    }

  private:
    double* scratch() { return &scratch_[static_cast<size_t>(thread_id()) * scratch_per_thread_]; }

    double score_gain(int64_t i) const { return eta_ > 0.0 ? eta_ * std::log1p(s_[i] / total_) : 0.0; }

    // Brings candidates idx[0..count) (count <= lanes_) up to date with all picks so far and writes their
    // exact marginal gains to gain[0..count).
    void update(const int64_t* idx, int count, double* gain) {
        const int64_t t = static_cast<int64_t>(out_.picks.size());
        CandidateGroup<T> g;
        g.lanes = count;
        for (int w = 0; w < count; ++w) {
            const int64_t i = idx[w];
            g.row[w] = emb_ + i * d_;
            g.chol[w] = &chol_[i * kk_];
            g.d2[w] = &d2_[i];
            g.sq[w] = &sq_[i];
            g.from[w] = stamp_[i];
        }
        kernels_.update(g, t, picks_.view(), gamma_, scratch());
        for (int w = 0; w < count; ++w) {
            const int64_t i = idx[w];
            stamp_[i] = t;
            logd2_[i] = std::log(d2_[i]);
            gain[w] = logd2_[i] + score_gain(i);
        }
    }

    void commit(int64_t j, double gain) {
        const int64_t t = static_cast<int64_t>(out_.picks.size());
        out_.picks.push_back(j);
        out_.gains.push_back(gain);
        taken_[j] = 1;
        total_ += s_[j];
        std::copy(emb_ + j * d_, emb_ + (j + 1) * d_, &picks_.rows[t * picks_.dp]);  // widened to float64
        if (t == 0) sq_[j] = kernels_.sqnorm(emb_ + j * d_, d_, picks_.dp, scratch());  // never updated
        picks_.sqnorm[t] = sq_[j];
        std::copy(&chol_[j * kk_], &chol_[j * kk_] + t, &picks_.chol[t * kk_]);
        picks_.diag[t] = std::sqrt(d2_[j]);
    }

    void run_eager() {
        std::vector<int64_t> open;  // candidates not yet selected, in index order
        std::vector<double> gain(n_);
        for (int64_t t = 1; t < kk_; ++t) {
            open.clear();
            for (int64_t i = 0; i < n_; ++i)
                if (!taken_[i]) open.push_back(i);
            const int64_t count = static_cast<int64_t>(open.size());
            auto rows = [&](int64_t c) {
                for (int64_t a = c * kRowsPerItem; a < std::min(count, (c + 1) * kRowsPerItem); a += lanes_) {
                    const int lanes = static_cast<int>(std::min<int64_t>(lanes_, count - a));
                    update(&open[a], lanes, &gain[a]);
                }
            };
            pool_.run((count + kRowsPerItem - 1) / kRowsPerItem, rows);
            out_.kernel_entries += count;
            out_.row_reads += count;
            int64_t best = 0;  // first maximum: the lowest index among ties
            for (int64_t a = 1; a < count; ++a)
                if (gain[a] > gain[best]) best = a;
            if (!(gain[best] > 0.0)) return;
            commit(open[best], gain[best]);
        }
    }

    // Lazy greedy for t >= 1. Candidates not updated since the first pick wait in `pending`, a max-heap by
    // (s desc, index asc) (by index alone when eta = 0), so that the top of `pending` has the largest
    // bound log 2 + score_gain(i) among them; they move to the main heap once that bound reaches the
    // main heap's top key. With large eta most candidates never leave `pending`.
    void run_lazy() {
        std::vector<int64_t> pending;
        pending.reserve(n_);
        for (int64_t i = 0; i < n_; ++i)
            if (!taken_[i]) pending.push_back(i);
        const auto pending_below = [this](int64_t a, int64_t b) {
            return eta_ > 0.0 && s_[a] != s_[b] ? s_[a] < s_[b] : a > b;
        };
        std::make_heap(pending.begin(), pending.end(), pending_below);

        LazyHeap heap;
        std::vector<size_t> positions, work;
        for (int64_t t = 1; t < kk_; ++t) {
            size_t batch = kFirstBatch;
            for (;;) {
                // Admit pending candidates whose bound reaches the top key; ties are admitted too, so an
                // equal bound with a lower index is never left behind.
                while (!pending.empty()) {
                    const int64_t i = pending.front();
                    const double key = logd2_[i] + score_gain(i);
                    if (!heap.empty() && key < heap.top().key) break;
                    std::pop_heap(pending.begin(), pending.end(), pending_below);
                    pending.pop_back();
                    heap.push({key, i, t});
                }
                if (stamp_[heap.top().idx] == t) break;  // exact, and ranks above every bound
                heap.leading_positions(batch, [&](const HeapEntry& e) { return stamp_[e.idx] != t; }, positions);
                if (tighten(heap, positions, work, t) > 0) batch = std::min(2 * batch, kMaxBatch);
                heap.restore(positions);
            }
            const HeapEntry top = heap.pop_top();
            if (!(top.key > 0.0)) return;
            commit(top.idx, top.key);
        }
    }

    // Lowers the stale bounds at `positions` to what is cheapest to know: an entry whose score term is
    // older than T_t gets the current score term (no kernel entries); the others are brought up to date
    // (kernel entries against the picks they have not seen) and get their exact gain. Those are updated in
    // groups of lanes_ candidates with similar stamps (sorted by stamp, then index), in parallel.
    // Returns the number of candidates updated.
    int64_t tighten(LazyHeap& heap, const std::vector<size_t>& positions, std::vector<size_t>& work, int64_t t) {
        work.clear();
        int64_t entries = 0;
        for (size_t p : positions) {
            HeapEntry& e = heap.at(p);
            if (eta_ > 0.0 && e.score_step != t) {
                e.key = logd2_[e.idx] + score_gain(e.idx);
                e.score_step = t;
                continue;
            }
            work.push_back(p);
            entries += t - stamp_[e.idx];
        }
        std::sort(work.begin(), work.end(), [&](size_t a, size_t b) {
            const int64_t ia = heap.at(a).idx, ib = heap.at(b).idx;
            return stamp_[ia] != stamp_[ib] ? stamp_[ia] < stamp_[ib] : ia < ib;
        });
        const int64_t nw = static_cast<int64_t>(work.size());
        auto group = [&](int64_t gi) {
            // Start loading the next group's embedding and Cholesky rows while this one is computed.
            // (Written inline: GCC drops calls to a helper made only of prefetches as free of effects.)
            for (int64_t a = (gi + 1) * lanes_; a < std::min(nw, (gi + 2) * lanes_); ++a) {
                const int64_t i = heap.at(work[a]).idx;
                const char* row = reinterpret_cast<const char*>(emb_ + i * d_);
                for (int64_t b = 0; b < d_ * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(row + b, 0, 2);
                const char* c = reinterpret_cast<const char*>(&chol_[i * kk_]);
                for (int64_t b = 0; b < t * 8; b += 64) __builtin_prefetch(c + b, 1, 2);
            }
            int64_t idx[kMaxLanes];
            double gain[kMaxLanes];
            const int lanes = static_cast<int>(std::min<int64_t>(lanes_, nw - gi * lanes_));
            for (int w = 0; w < lanes; ++w) idx[w] = heap.at(work[gi * lanes_ + w]).idx;
            update(idx, lanes, gain);
            for (int w = 0; w < lanes; ++w) {
                HeapEntry& e = heap.at(work[gi * lanes_ + w]);
                e.key = gain[w];
                e.score_step = t;
            }
        };
        const int64_t groups = (nw + lanes_ - 1) / lanes_;
        if (entries >= kParallelEntries) {
            pool_.run(groups, group);
        } else {
            for (int64_t gi = 0; gi < groups; ++gi) group(gi);
        }
        out_.kernel_entries += entries;
        out_.row_reads += nw;
        return nw;
    }

    const T* emb_;
    const double* s_;
    const int64_t n_, d_, kk_;
    const double eta_, gamma_;
    BatchPool& pool_;
    const Kernels<T> kernels_;
    const int lanes_;                         // candidates per kernel call (the SIMD width in doubles)
    Picks picks_;
    std::unique_ptr<double[]> chol_;          // (n, kk) c_i rows; entry m is written before it is read
    std::vector<double> d2_;                  // (n,) Schur complements, L_ii = 2 before any update
    std::vector<double> logd2_;               // (n,) log d2_i, the diversity gain
    std::vector<double> sq_;                  // (n,) ||e_i||^2, set at the first update (or first pick)
    std::vector<int64_t> stamp_;              // (n,) number of picks c_i is up to date with
    std::vector<char> taken_;                 // (n,) 1 once selected
    const int64_t scratch_per_thread_;        // doubles of kernel scratch per thread
    AlignedDoubles scratch_;                  // (threads, scratch_per_thread_), each thread's part aligned
    double total_ = 0.0;                      // T_t, the score sum of the picks
    GreedyResult out_;
};

}  // namespace

template <typename T>
GreedyResult greedy_logdet_dpp(const T* emb, const double* scores, int64_t n, int64_t d, int64_t k,
                               double eta, double gamma, bool lazy, int num_threads) {
    const int64_t kk = std::min(k, n);
    if (kk == 0) return GreedyResult{};
    simd_variant();  // an invalid TRUSTREPAIR_DPP_SIMD throws here, before any thread starts
    const int threads = resolve_threads(num_threads);
    BatchPool pool;
    GreedyResult result;
    std::exception_ptr error;
    // One parallel region for the whole selection: thread 0 runs the greedy and publishes batches of
    // candidate updates; the other threads help with them until the greedy is done.
#pragma omp parallel num_threads(threads)
    {
        if (thread_id() == 0) {
            try {
                Greedy<T> greedy(emb, scores, n, d, kk, eta, gamma, threads, pool);
                result = greedy.run(lazy);
            } catch (...) {
                error = std::current_exception();
            }
            pool.stop();
        } else {
            pool.help();
        }
    }
    if (error) std::rethrow_exception(error);
    return result;
}

std::vector<std::string> simd_variants() { return supported_variants(); }

std::string simd_variant() {
    const std::vector<std::string> names = supported_variants();
    const char* forced = std::getenv("TRUSTREPAIR_DPP_SIMD");
    if (forced == nullptr || *forced == '\0') return names.front();
    if (std::find(names.begin(), names.end(), forced) != names.end()) return forced;
    std::string known;
    for (const std::string& name : names) known += (known.empty() ? "" : ", ") + name;
    throw std::invalid_argument(std::string("TRUSTREPAIR_DPP_SIMD=") + forced + " is not a variant this CPU runs; use one of " +
                                known + " or unset it");
}

void kernel_exp(const double* x, double* out, int64_t n) { kernels_named<double>(simd_variant()).exp(x, out, n); }

template GreedyResult greedy_logdet_dpp<float>(const float*, const double*, int64_t, int64_t, int64_t,
                                               double, double, bool, int);
template GreedyResult greedy_logdet_dpp<double>(const double*, const double*, int64_t, int64_t, int64_t,
                                                double, double, bool, int);

}  // namespace trustrepair
