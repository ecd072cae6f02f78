// One CUDA thread block run on the host as fibers: every CUDA thread is a user-space context
// (ucontext) on the calling OS thread, switched by a round-robin scheduler only where a thread
// waits at a barrier. So a block of 256 threads costs no OS threads, no locks and no kernel
// scheduling, and a run is deterministic. Used by tests/emulation/gemm_on_host.cpp.
//
//   fb::run_grid(grid, threads, kernel)  runs kernel() for every thread of every block (blocks
//                                        one after another), with threadIdx / blockIdx /
//                                        blockDim / gridDim set for the running thread;
//   fb::sync_block()                     __syncthreads;
//   fb::sync_warp()                      a barrier of the 32 threads of the caller's warp (for
//                                        emulating warp-collective instructions);
//   fb::sync_named(id, count)            bar.sync id, count (a named barrier of count threads).
//
// A barrier that can never complete (threads of a block or warp waiting at different
// barriers, or some of them finished) is reported and aborts the run.
#pragma once

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <vector>

struct dim3e {
    unsigned x, y, z;
};
inline dim3e threadIdx, blockIdx, blockDim{1, 1, 1}, gridDim{1, 1, 1};

namespace fb {

struct Barrier {
    int arrived = 0;
    unsigned generation = 0;
};

struct Block {
    int threads = 0;
    int current = 0;
    ucontext_t scheduler;
    std::vector<ucontext_t> ctx;
    std::vector<std::unique_ptr<char[]>> stacks;
    std::vector<char> finished;
    int live = 0;
    long progress = 0;  // arrivals, releases and exits: a scheduler pass without any is a deadlock
    Barrier block_bar;
    std::vector<Barrier> warp_bars;
    Barrier named_bars[16];  // bar.sync id, count (id 0 is __syncthreads')
    const std::function<void()>* body = nullptr;
};
inline Block g_block;
constexpr size_t STACK_BYTES = 256 * 1024;

inline void yield_to_scheduler() { swapcontext(&g_block.ctx[g_block.current], &g_block.scheduler); }

inline void wait_at(Barrier& b, int count) {
    const unsigned gen = b.generation;
    ++g_block.progress;
    if (++b.arrived == count) {
        b.arrived = 0;
        ++b.generation;
        return;
    }
    while (b.generation == gen) yield_to_scheduler();
}

inline void sync_block() { wait_at(g_block.block_bar, g_block.threads); }
inline void sync_warp() { wait_at(g_block.warp_bars[g_block.current / 32], 32); }
// bar.sync id, count: the first `count` threads to arrive at barrier `id` (1..15) are released.
inline void sync_named(int id, int count) { wait_at(g_block.named_bars[id], count); }

inline void fiber_entry() {
    (*g_block.body)();
    g_block.finished[g_block.current] = 1;
    --g_block.live;
    ++g_block.progress;
    swapcontext(&g_block.ctx[g_block.current], &g_block.scheduler);  // never resumed
}

// Runs one block of `threads` threads (a multiple of 32) to completion.
inline void run_block(int threads, const std::function<void()>& kernel) {
    Block& b = g_block;
    if (b.threads != threads) {
        b.threads = threads;
        b.ctx.assign(threads, ucontext_t{});
        b.stacks.clear();
        for (int t = 0; t < threads; ++t) b.stacks.emplace_back(new char[STACK_BYTES]);
    }
    b.finished.assign(threads, 0);
    b.warp_bars.assign((threads + 31) / 32, Barrier{});
    b.block_bar = Barrier{};
    for (Barrier& nb : b.named_bars) nb = Barrier{};
    b.body = &kernel;
    b.live = threads;
    for (int t = 0; t < threads; ++t) {
        getcontext(&b.ctx[t]);
        b.ctx[t].uc_stack.ss_sp = b.stacks[t].get();
        b.ctx[t].uc_stack.ss_size = STACK_BYTES;
        b.ctx[t].uc_link = nullptr;
        makecontext(&b.ctx[t], fiber_entry, 0);
    }
    while (b.live > 0) {
        const long before = b.progress;
        for (int t = 0; t < threads; ++t) {
            if (b.finished[t]) continue;
            b.current = t;
            threadIdx = {(unsigned)t, 0, 0};
            swapcontext(&b.scheduler, &b.ctx[t]);
        }
        if (b.live > 0 && b.progress == before) {
            std::printf("DEADLOCK: block (%u,%u,%u): %d threads wait at barriers that cannot complete\n", blockIdx.x,
                        blockIdx.y, blockIdx.z, b.live);
            std::exit(2);
        }
    }
}

// Runs every block of `grid` (x fastest), `threads` threads each.
inline void run_grid(dim3e grid, int threads, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = {(unsigned)threads, 1, 1};
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = {x, y, z};
                run_block(threads, kernel);
            }
}

}  // namespace fb
