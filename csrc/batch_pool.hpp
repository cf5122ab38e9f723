// Runs batches of independent items on the thread that publishes them plus helper threads that poll for
// work (the threads of one OpenMP parallel region spanning the whole selection).
//
// Why not an OpenMP loop per batch: the lazy greedy runs thousands of small batches, and every
// `omp parallel for` ends in a join that waits for each thread to arrive. On a machine with more
// runnable threads than cores, a helper that the OS has descheduled stalls every join for a time slice
// (milliseconds). Here the publisher claims items itself and waits only for items a helper has already
// claimed, so a sleeping helper costs nothing. Which thread runs an item never changes its result.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>

namespace trustrepair {

class BatchPool {
  public:
    // Publisher: runs fn(i) for i in [0, count) on this thread and any helpers, and returns when all
    // are done. Not re-entrant; fn must not throw.
    template <typename Fn>
    void run(int64_t count, Fn& fn) {
        if (count <= 0) return;
        ctx_ = &fn;
        call_ = [](void* ctx, int64_t i) { (*static_cast<Fn*>(ctx))(i); };
        done_.store(0, std::memory_order_relaxed);
        const uint64_t gen = (claim_.load(std::memory_order_relaxed) >> 32) + 1;
        limit_.store(gen << 32 | static_cast<uint64_t>(count), std::memory_order_release);
        claim_.store(gen << 32, std::memory_order_release);  // publishes ctx_, call_, done_ and limit_
        work(gen);
        for (int spins = 0; done_.load(std::memory_order_acquire) < count; ++spins) backoff(spins);
    }

    // Helper: takes items of every published batch until stop() is called.
    void help() {
        uint64_t seen = 0;
        for (int spins = 0; !stop_.load(std::memory_order_acquire);) {
            const uint64_t gen = claim_.load(std::memory_order_acquire) >> 32;
            if (gen != seen) {
                work(gen);
                seen = gen;
                spins = 0;
            } else {
                backoff(spins++);
            }
        }
    }

    void stop() { stop_.store(true, std::memory_order_release); }

  private:
    // Claims and runs items of batch `gen` until none is left. An item is claimed by advancing the
    // (generation, next item) word; the claim can only succeed while that batch is current, and the
    // publisher does not move on before every claimed item is done.
    void work(uint64_t gen) {
        for (;;) {
            uint64_t c = claim_.load(std::memory_order_acquire);
            const uint64_t lim = limit_.load(std::memory_order_acquire);
            if ((c >> 32) != gen || (lim >> 32) != gen) return;
            if ((c & 0xffffffffu) >= (lim & 0xffffffffu)) return;
            if (!claim_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel)) continue;
            call_(ctx_, static_cast<int64_t>(c & 0xffffffffu));
            done_.fetch_add(1, std::memory_order_release);
        }
    }

    // Spin briefly (the next batch usually follows within microseconds), then yield the core.
    static void backoff(int spins) {
        if (spins < 2000) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        } else {
            std::this_thread::yield();
        }
    }

    std::atomic<uint64_t> claim_{0};  // generation << 32 | next unclaimed item
    std::atomic<uint64_t> limit_{0};  // generation << 32 | number of items
    std::atomic<int64_t> done_{0};    // items of the current batch finished
    std::atomic<bool> stop_{false};
    void* ctx_ = nullptr;
    void (*call_)(void*, int64_t) = nullptr;
};

}  // namespace trustrepair
