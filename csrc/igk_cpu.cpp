/*
 * igk_cpu.cpp -- the CPU twin of the fused step: the per-block code of igk_math.h in a host loop.
 *
 * Work items are (row, 4-element block) pairs, exactly the CUDA kernel's threads; large launches
 * are split over std::threads in contiguous ranges (no shared writes except first_bad, see
 * igk_flag_first_bad). Compiled with -ffp-contract=off: every float32 operation rounds once.
 * Indexed launches read their scalars from a host table at a host counter, like the CUDA kernel
 * does on the device, and report a refused launch both as a status and in the table's fault word.
 */
#include <algorithm>
#include <thread>
#include <vector>

#include "igk_common.h"
#include "igk_math.h"

#ifndef IGK_BUILD_INFO
#define IGK_BUILD_INFO "cpu twin"
#endif

namespace {

/* Below this many elements one thread is faster than starting more. */
constexpr int64_t kParallelThreshold = int64_t(1) << 16;

template <typename F>
void parallel_blocks(int64_t n, int64_t blocks, int64_t elements, int num_threads, F&& body) {
    const int64_t total = n * blocks;
    int threads = num_threads > 0 ? num_threads : (int)std::max(1u, std::thread::hardware_concurrency());
    if (elements < kParallelThreshold) threads = 1;
    threads = (int)std::min<int64_t>(threads, total);
    auto run = [&](int64_t lo, int64_t hi) {
        int64_t row = lo / blocks, blk = lo % blocks;
        for (int64_t w = lo; w < hi; ++w) {
            body(row, blk);
            if (++blk == blocks) blk = 0, ++row;
        }
    };
    if (threads <= 1) {
        run(0, total);
        return;
    }
    std::vector<std::thread> pool;
    pool.reserve(threads - 1);
    const int64_t chunk = (total + threads - 1) / threads;
    for (int t = 1; t < threads; ++t) {
        const int64_t lo = std::min(total, t * chunk), hi = std::min(total, lo + chunk);
        pool.emplace_back(run, lo, hi);
    }
    run(0, std::min(total, chunk));
    for (auto& th : pool) th.join();
}

template <int DT, bool VEC>
void step_all(const igk_step_params& p, const igk_step_buffers& b, int num_threads) {
    parallel_blocks(b.n, igk::num_blocks(b.e), b.n * b.e, num_threads,
                    [&](int64_t n, int64_t blk) { igk_step_block<DT, VEC>(p, b, n, blk); });
}

template <int DT>
void step_dtype(const igk_step_params& p, const igk_step_buffers& b, int num_threads) {
    if (igk::can_vectorise(&b))
        step_all<DT, true>(p, b, num_threads);
    else
        step_all<DT, false>(p, b, num_threads);
}

void step_any(const igk_step_params& p, const igk_step_buffers& b, int num_threads) {
    switch (b.v_dtype) {
        case IGK_DTYPE_F32: step_dtype<IGK_DTYPE_F32>(p, b, num_threads); break;
        case IGK_DTYPE_BF16: step_dtype<IGK_DTYPE_BF16>(p, b, num_threads); break;
        default: step_dtype<IGK_DTYPE_F16>(p, b, num_threads); break;
    }
}

}  // namespace

extern "C" {

IGK_EXPORT int igk_abi_version(void) { return IGK_ABI_VERSION; }
IGK_EXPORT int igk_params_size(void) { return (int)sizeof(igk_step_params); }
IGK_EXPORT int igk_buffers_size(void) { return (int)sizeof(igk_step_buffers); }
IGK_EXPORT int igk_table_size(void) { return (int)sizeof(igk_step_table); }
IGK_EXPORT const char* igk_build_info(void) { return IGK_BUILD_INFO; }
IGK_EXPORT const char* igk_last_error(void) { return igk::error_buffer(); }

IGK_EXPORT int igk_cpu_step(const igk_step_params* p, const igk_step_buffers* b, int num_threads) {
    const int status = igk::validate(p, b);
    if (status != IGK_OK) return status;
    step_any(*p, *b, num_threads);
    return igk::ok();
}

IGK_EXPORT int igk_cpu_step_indexed(const igk_step_table* t, const igk_step_buffers* b, int num_threads) {
    const int status = igk::validate_indexed(t, b);
    if (status != IGK_OK) return status;
    /* The CUDA kernel's sequence: read the counter, check the scalars, run (or record the fault), advance. */
    const int64_t k = *t->counter;
    int fault = (k < 0 || k >= t->count) ? IGK_FAULT_COUNTER : IGK_FAULT_NONE;
    igk_step_params p{};
    if (fault == IGK_FAULT_NONE) {
        p = t->params[k];
        fault = igk_launch_fault(p, *b, t->v_rows, t->net_rows);
    }
    if (fault == IGK_FAULT_NONE) step_any(p, igk_select_buffers(p, *b), num_threads);
    *t->counter = k + 1;
    if (fault == IGK_FAULT_NONE) return igk::ok();
    if (t->fault && t->fault[0] == IGK_FAULT_NONE) {
        t->fault[0] = fault;
        t->fault[1] = k;
    }
    return igk::fail(igk::fault_status(fault), "launch %lld of a table of %lld: %s", (long long)k, (long long)t->count,
                     igk::fault_text(fault));
}

IGK_EXPORT int igk_cpu_philox(uint64_t seed, uint32_t stream, const int64_t* indices, int64_t n, int64_t blocks,
                              uint32_t* out) {
    if (!indices || !out) return igk::fail(IGK_ERR_NULL, "indices and out must not be NULL");
    if (n <= 0 || blocks <= 0) return igk::fail(IGK_ERR_SIZE, "n and blocks must be > 0");
    for (int64_t r = 0; r < n; ++r)
        for (int64_t blk = 0; blk < blocks; ++blk)
            igk_noise_words((uint32_t)seed, (uint32_t)(seed >> 32), (uint64_t)blk, stream, (uint64_t)indices[r],
                            out + (r * blocks + blk) * 4);
    return igk::ok();
}

IGK_EXPORT int igk_cpu_philox_raw(const uint32_t* ctr, const uint32_t* key, int64_t count, uint32_t* out) {
    if (!ctr || !key || !out) return igk::fail(IGK_ERR_NULL, "ctr, key and out must not be NULL");
    if (count < 0) return igk::fail(IGK_ERR_SIZE, "count must be >= 0");
    for (int64_t i = 0; i < count; ++i)
        igk_philox4x32_10(ctr[4 * i], ctr[4 * i + 1], ctr[4 * i + 2], ctr[4 * i + 3], key[2 * i], key[2 * i + 1],
                          out + 4 * i);
    return igk::ok();
}

IGK_EXPORT int igk_cpu_gaussian(uint64_t seed, uint32_t stream, const int64_t* indices, int64_t n, int64_t numel,
                                float* out, int num_threads) {
    if (!indices || !out) return igk::fail(IGK_ERR_NULL, "indices and out must not be NULL");
    if (n <= 0 || numel <= 0) return igk::fail(IGK_ERR_SIZE, "n and numel must be > 0");
    parallel_blocks(n, igk::num_blocks(numel), n * numel, num_threads,
                    [&](int64_t r, int64_t blk) { igk_gaussian_block(seed, stream, indices, numel, out, r, blk); });
    return igk::ok();
}

/* The CPU library has no CUDA entry points: the binding asks the CUDA library for those. */

}  // extern "C"
