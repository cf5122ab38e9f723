// The priority queue of the lazy greedy: a binary max-heap of gain bounds whose keys can be lowered in
// place, a batch at a time, without popping and pushing back.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

namespace trustrepair {

// A candidate with an upper bound (key) on its current marginal gain; score_step is the greedy step
// whose score total the key's score term used.
struct HeapEntry {
    double key;
    int64_t idx;
    int64_t score_step;
};

// Rank order: larger key first, then lower index (the greedy's tie-break).
inline bool ranks_above(const HeapEntry& a, const HeapEntry& b) {
    return a.key > b.key || (a.key == b.key && a.idx < b.idx);
}

class LazyHeap {
  public:
    bool empty() const { return h_.empty(); }
    const HeapEntry& top() const { return h_.front(); }
    HeapEntry& at(size_t pos) { return h_[pos]; }

    void push(const HeapEntry& e) {
        h_.push_back(e);
        sift_up(h_.size() - 1);
    }

    HeapEntry pop_top() {
        const HeapEntry top = h_.front();
        h_.front() = h_.back();
        h_.pop_back();
        if (!h_.empty()) sift_down(0);
        return top;
    }

    // Positions of the highest-ranked entries in rank order, stopping before the first entry for which
    // wanted(entry) is false or after `limit` of them; found by a best-first walk down from the root,
    // which visits O(limit) nodes near the top.
    template <typename Wanted>
    void leading_positions(size_t limit, Wanted wanted, std::vector<size_t>& out) {
        out.clear();
        frontier_.assign(1, 0);
        const auto below = [this](size_t a, size_t b) { return ranks_above(h_[b], h_[a]); };
        while (!frontier_.empty() && out.size() < limit) {
            std::pop_heap(frontier_.begin(), frontier_.end(), below);
            const size_t p = frontier_.back();
            frontier_.pop_back();
            if (!wanted(h_[p])) break;
            out.push_back(p);
            for (size_t c = 2 * p + 1; c <= 2 * p + 2 && c < h_.size(); ++c) {
                frontier_.push_back(c);
                std::push_heap(frontier_.begin(), frontier_.end(), below);
            }
        }
    }

    // Restores the heap after the keys at `positions` (distinct) were lowered: sifting them down deepest
    // first keeps every subtree a heap, as in heap construction.
    void restore(std::vector<size_t>& positions) {
        std::sort(positions.begin(), positions.end(), std::greater<size_t>());
        for (size_t p : positions) sift_down(p);
    }

  private:
    void sift_up(size_t p) {
        const HeapEntry e = h_[p];
        while (p > 0) {
            const size_t parent = (p - 1) / 2;
            if (!ranks_above(e, h_[parent])) break;
            h_[p] = h_[parent];
            p = parent;
        }
        h_[p] = e;
    }

    void sift_down(size_t p) {
        const HeapEntry e = h_[p];
        const size_t n = h_.size();
        for (;;) {
            size_t c = 2 * p + 1;
            if (c >= n) break;
            if (c + 1 < n && ranks_above(h_[c + 1], h_[c])) ++c;
            if (!ranks_above(h_[c], e)) break;
            h_[p] = h_[c];
            p = c;
        }
        h_[p] = e;
    }

    std::vector<HeapEntry> h_;
    std::vector<size_t> frontier_;
};

}  // namespace trustrepair
