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
// Groups. Candidates are updated in groups of kGroup = 8 that are always brought up to date as a whole, so
// a group's rows share the picks they have seen, their Cholesky rows are stored lane-major per group, and
// their distances to the new picks are one register-blocked product of 8 rows with up to 4 pick rows at a
// time (dpp_kernels.hpp). Groups are formed lazily, 8 candidates at a time in grouping order: by s,
// largest first, then by index (by index alone when eta = 0, so consecutive rows), skipping the first pick.
// With large eta a group update then computes the candidates the greedy takes next (5.4k entries against
// 5.1k per candidate at N = 2,000, eta = 1e4; index-ordered groups took 35k). A group update may compute
// entries a per-candidate lazy greedy would have skipped (about 15 % more at N = 2,000, eta in {0, 1}), in
// exchange for dot products at close to the GEMM rate and a priority queue of N / 8 entries.
//
// Lazy evaluation (Minoux's accelerated greedy). From t >= 1 on, d2_i never increases (each update
// subtracts e_i^2 >= 0) and T_t never decreases, so a gain computed at an earlier step is an upper bound
// on the current one. Rounding keeps this: IEEE subtraction, addition, division and multiplication are
// monotone, and the libm log and log1p are taken to be monotone (they are within an ulp of correctly
// rounded); the tests check lazy against eager picks. A group's bound is the largest of its remaining
// candidates' bounds, attained at the lowest such index. The bounds live in three tiers, cheapest first:
//   * not yet grouped: candidates never updated since the first pick, bound log 2 + eta log1p(s_i / T_t),
//     largest for the next candidate in grouping order; the next group is formed, and enters the main
//     heap with its first candidate's bound, once that bound reaches the main heap's top key (ties
//     included);
//   * a bound whose score terms are older than T_t is first re-keyed with the current score terms (no
//     kernel entries);
//   * otherwise the group is updated against the picks it has not seen (kernel entries), which gives its
//     candidates' exact gains.
// The main heap (lazy_heap.hpp) is ordered by key, then lowest index. When its top is exact, the top's
// candidate is the greedy pick, tie-break included: every other candidate's gain is <= its group's bound
// <= the top's gain, and a candidate of another group with a gain equal to the top's has a bound equal
// to its group's key, so an index no lower than that group's entry, which ranks below the top. Otherwise the
// stale entries ranked above the best exact one are processed in batches (1 group, doubling to 128 within
// a step) and re-sorted in place. After a pick its group goes back to the heap with its remaining
// candidates. The first pick's gains contain eta log s_i, which bounds nothing later because the score
// term then starts from log(0): the heap is built only after the first pick. The eager mode (lazy=false)
// updates every group at every step. A candidate's values never depend on its lane, thread or on how many
// picks an update covers (each value is computed by the same operations in the same order), so both
// modes return the same picks with bit-identical gains.
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
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <stdexcept>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace trustrepair {
namespace {

// Lazy batches: the stale groups at the top of the heap are updated kFirstBatch at a time, doubling (up
// to kMaxBatch) while a step keeps needing more; neither the batch sizes nor the thread count change the
// picks, only how much work is done in parallel.
constexpr size_t kFirstBatch = 1;
constexpr size_t kMaxBatch = 128;
constexpr int64_t kParallelEntries = 64;  // batches with fewer kernel entries run on the greedy's thread
constexpr int64_t kGroupsPerItem = 64;    // groups per work item in the eager greedy's passes

// n doubles starting on a 64-byte boundary (a cache line), zero-initialised or not. With rows padded to
// multiples of 8 doubles, every AVX-512 load of a row then touches one cache line, not two: unaligned
// rows made the dot products run at half speed. Buffers of 1 MiB or more (the Cholesky rows) are placed
// on 2 MiB boundaries and offered to the kernel as transparent huge pages: when every selection maps its
// buffers afresh (glibc above its mmap threshold), faulting in 4 KiB pages cost 0.75 ms of 4.5 at
// N = 2,000, and huge pages took 0.4-0.5 ms of it off (50,000: 20-26 ms of 150-190).
class AlignedDoubles {
  public:
    AlignedDoubles(size_t n, bool zeroed) {
        const size_t align = n * sizeof(double) >= kHugeFrom ? kHugePage : kLine;
        const size_t bytes = (n * sizeof(double) + align - 1) / align * align;
        void* p = std::aligned_alloc(align, bytes == 0 ? align : bytes);
        if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
        if (align == kHugePage) madvise(p, bytes, MADV_HUGEPAGE);  // advice only: refused, 4 KiB pages serve
#endif
        if (zeroed) std::memset(p, 0, bytes);
        data_.reset(static_cast<double*>(p));
    }
    double* data() { return data_.get(); }
    const double* data() const { return data_.get(); }
    double& operator[](size_t i) { return data_[i]; }

  private:
    struct Free {
        void operator()(double* p) const { std::free(p); }
    };
    static constexpr size_t kLine = 64, kHugePage = size_t(1) << 21, kHugeFrom = size_t(1) << 20;
    std::unique_ptr<double[], Free> data_;
};

// The selected set, read-only while candidates are updated (PicksView points into it).
struct Picks {
    int64_t d, dp, kk;
    AlignedDoubles rows;         // (kk, dp) embeddings of the picks, widened to float64, zero-padded
    std::vector<double> sqnorm;  // (kk,)   ||e_{j_m}||^2
    std::vector<double> chol;    // (kk, kk) row m holds c_{j_m}[0:m] (lower-triangular V)
    std::vector<double> diag;    // (kk,)   sqrt(d2_{j_m}) at selection = V[m, m]
    Picks(int64_t d_, int64_t kk_)
        : d(d_), dp(padded_width(d_)), kk(kk_), rows(kk_ * dp, true), sqnorm(kk_), chol(kk_ * kk_), diag(kk_) {}
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
        : emb_(emb), s_(s), n_(n), d_(d), kk_(kk), groups_((n + kGroup - 1) / kGroup), eta_(eta), gamma_(gamma),
          pool_(pool), kernels_(kernels_named<T>(simd_variant())), picks_(d, kk), zeros_(d),
          chol_(groups_ * kk * kGroup, false), d2_(groups_ * kGroup, false), sq_(groups_ * kGroup, false),
          logd2_(groups_ * kGroup, std::log(2.0)), cand_(groups_ * kGroup, -1), pos_(n, -1), stamp_(groups_, 0),
          live_(groups_, 0), taken_(groups_ * kGroup, 1), scratch_per_thread_(padded_width(scratch_doubles(d, kk))),
          scratch_(static_cast<size_t>(threads) * scratch_per_thread_, false) {
        for (int64_t p = 0; p < groups_ * kGroup; ++p) d2_[p] = 2.0;
    }

    GreedyResult run(bool lazy) {
        // First pick: every candidate has d2_i = L_ii = 1 + K_ii = 2, so only the score term differs.
        int64_t first = 0;
        double best = -HUGE_VAL;
        for (int64_t i = 0; i < n_; ++i) {
            const double g = std::log(2.0) + (eta_ > 0.0 ? eta_ * std::log(s_[i]) : 0.0);
            if (g > best) best = g, first = i;
        }
        commit(first, best);  // finite: when eta > 0 some s_i > 0 (checked by the caller)
        for (int64_t i = 0; i < n_; ++i)
            if (i != first) unformed_.push_back(i);
        if (eta_ > 0.0) std::make_heap(unformed_.begin(), unformed_.end(), grouping_order());
        if (lazy)
            run_lazy();
        else
            run_eager();
        return std::move(out_);
    }

  private:
    double* scratch() { return &scratch_[static_cast<size_t>(thread_id()) * scratch_per_thread_]; }

    double score_gain(int64_t i) const { return eta_ > 0.0 ? eta_ * std::log1p(s_[i] / total_) : 0.0; }

    int64_t group_of(int64_t i) const { return pos_[i] / kGroup; }

    // The order in which candidates are grouped, as a heap's "below": by s, largest first, then by index
    // (by index alone when eta = 0), so that the bound log 2 + score_gain(i) of a group never updated is
    // its first candidate's, and, with large eta, a group update computes the candidates taken next.
    auto grouping_order() const {
        return [this](int64_t a, int64_t b) { return eta_ > 0.0 && s_[a] != s_[b] ? s_[a] < s_[b] : a > b; };
    }

    // The next candidate to be grouped, or -1.
    int64_t next_unformed() const {
        if (unformed_.empty()) return -1;
        return eta_ > 0.0 ? unformed_.front() : unformed_[cursor_];
    }

    // Forms the next group from the next kGroup candidates in grouping order (fewer at the end); returns
    // its id. Groups are numbered, and their Cholesky blocks laid out, in the order they are formed, so a
    // selection that forms few groups (large eta) touches few pages of chol_.
    int64_t form_group() {
        const int64_t g = formed_++;
        int64_t* members = &cand_[g * kGroup];
        while (live_[g] < kGroup && next_unformed() >= 0) {
            if (eta_ > 0.0) {
                std::pop_heap(unformed_.begin(), unformed_.end(), grouping_order());
                members[live_[g]++] = unformed_.back();
                unformed_.pop_back();
            } else {
                members[live_[g]++] = unformed_[cursor_++];
                if (cursor_ == static_cast<int64_t>(unformed_.size())) unformed_.clear();
            }
        }
        for (int w = 0; w < live_[g]; ++w) {
            pos_[members[w]] = g * kGroup + w;
            taken_[g * kGroup + w] = 0;
        }
        return g;
    }

    // Brings group g up to date with all picks so far (its candidates' log d2_i included).
    void update(int64_t g) {
        const int64_t t = static_cast<int64_t>(out_.picks.size());
        CandidateGroup<T> c;
        for (int w = 0; w < kGroup; ++w) {
            const int64_t i = cand_[g * kGroup + w];
            c.row[w] = i >= 0 ? emb_ + i * d_ : zeros_.data();
        }
        c.chol = &chol_[g * kk_ * kGroup];
        c.d2 = &d2_[g * kGroup];
        c.sq = &sq_[g * kGroup];
        c.from = stamp_[g];
        kernels_.update(c, t, picks_.view(), gamma_, scratch());
        stamp_[g] = t;
        for (int64_t p = g * kGroup; p < (g + 1) * kGroup; ++p)
            if (!taken_[p]) logd2_[p] = std::log(d2_[p]);
    }

    // The largest of log d2_i + score_gain(i) over the group's candidates not yet selected, at the lowest
    // such index, with the current score total (step t); idx = -1 when none is left.
    HeapEntry group_key(int64_t g, int64_t t) const {
        HeapEntry e{-HUGE_VAL, -1, t};
        for (int64_t p = g * kGroup; p < (g + 1) * kGroup; ++p) {
            if (taken_[p]) continue;
            const int64_t i = cand_[p];
            const double key = logd2_[p] + score_gain(i);
            if (e.idx < 0 || key > e.key || (key == e.key && i < e.idx)) e.key = key, e.idx = i;
        }
        return e;
    }

    // Kernel entries an update of group g to step t computes for its candidates not yet selected.
    int64_t entries(int64_t g, int64_t t) const { return live_[g] * (t - stamp_[g]); }

    void commit(int64_t j, double gain) {
        const int64_t t = static_cast<int64_t>(out_.picks.size());
        out_.picks.push_back(j);
        out_.gains.push_back(gain);
        total_ += s_[j];
        std::copy(emb_ + j * d_, emb_ + (j + 1) * d_, &picks_.rows[t * picks_.dp]);  // widened to float64
        if (t == 0) {  // in no group
            picks_.sqnorm[0] = kernels_.sqnorm(emb_ + j * d_, d_, picks_.dp, scratch());
            picks_.diag[0] = std::sqrt(2.0);
            return;
        }
        const int64_t p = pos_[j], g = p / kGroup, w = p % kGroup;
        taken_[p] = 1;
        --live_[g];
        picks_.sqnorm[t] = sq_[p];
        for (int64_t q = 0; q < t; ++q) picks_.chol[t * kk_ + q] = chol_[(g * kk_ + q) * kGroup + w];
        picks_.diag[t] = std::sqrt(d2_[p]);
    }

    void run_eager() {
        while (next_unformed() >= 0) form_group();
        std::vector<int64_t> open;  // groups with candidates not yet selected
        for (int64_t t = 1; t < kk_; ++t) {
            open.clear();
            for (int64_t g = 0; g < formed_; ++g)
                if (live_[g] > 0) open.push_back(g);
            const int64_t count = static_cast<int64_t>(open.size());
            auto groups = [&](int64_t c) {
                const int64_t end = std::min(count, (c + 1) * kGroupsPerItem);
                for (int64_t a = c * kGroupsPerItem; a < end; ++a) update(open[a]);
            };
            pool_.run((count + kGroupsPerItem - 1) / kGroupsPerItem, groups);
            HeapEntry best{-HUGE_VAL, -1, t};  // the largest gain, at the lowest index among ties
            for (int64_t g : open) {
                out_.kernel_entries += live_[g];
                out_.row_reads += live_[g];
                const HeapEntry e = group_key(g, t);
                if (best.idx < 0 || ranks_above(e, best)) best = e;
            }
            if (!(best.key > 0.0)) return;
            commit(best.idx, best.key);
        }
    }

    // Lazy greedy for t >= 1 over groups. A heap entry is a group, keyed by an upper bound on its
    // candidates' gains and the candidate that attains it (group_of(idx)). Candidates not yet grouped wait
    // in grouping order; the next kGroup of them form a group, entering the heap with the bound
    // log 2 + score_gain(i) of the first of them (the largest among all of them), once that bound reaches
    // the heap's top key. With large eta most candidates are never grouped.
    void run_lazy() {
        LazyHeap heap;
        std::vector<size_t> positions, work;
        std::vector<int64_t> work_groups;
        for (int64_t t = 1; t < kk_; ++t) {
            size_t batch = kFirstBatch;
            for (;;) {
                // Group and admit while the next bound reaches the top key; ties are admitted too, so an
                // equal bound with a lower index is never left behind.
                for (int64_t i = next_unformed(); i >= 0; i = next_unformed()) {
                    const double key = std::log(2.0) + score_gain(i);
                    if (!heap.empty() && key < heap.top().key) break;
                    form_group();
                    heap.push({key, i, t});
                }
                if (stamp_[group_of(heap.top().idx)] == t) break;  // exact, and ranks above every bound
                heap.leading_positions(
                    batch, [&](const HeapEntry& e) { return stamp_[group_of(e.idx)] != t; }, positions);
                if (tighten(heap, positions, work, work_groups, t) > 0) batch = std::min(2 * batch, kMaxBatch);
                heap.restore(positions);
            }
            const HeapEntry top = heap.pop_top();
            if (!(top.key > 0.0)) return;
            const int64_t g = group_of(top.idx);
            commit(top.idx, top.key);
            const HeapEntry rest = group_key(g, t + 1);  // exact at t: bounds from t + 1 on
            if (rest.idx >= 0) heap.push(rest);
        }
    }

    // Lowers the stale bounds at `positions` to what is cheapest to know: a group whose key's score term
    // is older than T_t gets the current score terms (no kernel entries); the others are brought up to
    // date (kernel entries against the picks they have not seen) and get their exact best gain, in
    // parallel. Returns the number of groups updated.
    int64_t tighten(LazyHeap& heap, const std::vector<size_t>& positions, std::vector<size_t>& work,
                    std::vector<int64_t>& work_groups, int64_t t) {
        work.clear();
        work_groups.clear();
        int64_t total = 0;
        for (size_t p : positions) {
            HeapEntry& e = heap.at(p);
            const int64_t g = group_of(e.idx);
            if (eta_ > 0.0 && e.score_step != t) {
                e = group_key(g, t);
                continue;
            }
            work.push_back(p);
            work_groups.push_back(g);
            total += entries(g, t);
            out_.row_reads += live_[g];
        }
        const int64_t nw = static_cast<int64_t>(work.size());
        auto group = [&](int64_t a) {
            update(work_groups[a]);
            heap.at(work[a]) = group_key(work_groups[a], t);
        };
        if (total >= kParallelEntries) {
            pool_.run(nw, group);
        } else {
            for (int64_t a = 0; a < nw; ++a) group(a);
        }
        out_.kernel_entries += total;
        return nw;
    }

    const T* emb_;
    const double* s_;
    const int64_t n_, d_, kk_, groups_;
    const double eta_, gamma_;
    BatchPool& pool_;
    const Kernels<T> kernels_;
    Picks picks_;
    const std::vector<T> zeros_;        // (d,) the row of empty lanes
    // Per position p = g kGroup + w (lane w of group g):
    AlignedDoubles chol_;               // (groups, kk, kGroup) c_i rows, lane-major per group; entry m is
                                        // written before it is read
    AlignedDoubles d2_;                 // Schur complements, L_ii = 2 before any update
    AlignedDoubles sq_;                 // ||e_i||^2, set at the group's first update
    std::vector<double> logd2_;         // log d2_i, the diversity gain
    std::vector<int64_t> cand_;         // the candidate there, -1 for an empty lane
    std::vector<int64_t> pos_;          // (n,) position of each candidate, -1 until grouped
    std::vector<int64_t> stamp_;        // (groups,) number of picks the group's c_i are up to date with
    std::vector<int> live_;             // (groups,) candidates of the group not yet selected
    std::vector<char> taken_;           // 1 once selected, and for empty lanes
    std::vector<int64_t> unformed_;     // candidates not yet grouped: a heap in grouping order (eta > 0),
                                        // or in index order from cursor_ (eta = 0)
    int64_t cursor_ = 0;
    int64_t formed_ = 0;                // groups formed
    const int64_t scratch_per_thread_;  // doubles of kernel scratch per thread
    AlignedDoubles scratch_;            // (threads, scratch_per_thread_), each thread's part aligned
    double total_ = 0.0;                // T_t, the score sum of the picks
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
