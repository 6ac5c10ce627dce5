/*
 * igk_kernels.cuh -- the CUDA kernels of the fused step and the noise contract: device code only
 * (no host code, no <<<>>>, no system headers), so that two compilers build the same text:
 *   nvcc   igk_cuda.cu includes this file and launches the kernels with <<<>>> (the CMake build);
 *   NVRTC  igengine/kernels/nvrtc.py compiles this file (with igk_math.h and igk_api.h) at first
 *          use for the GPU present and launches the kernels through the driver API.
 *
 * One thread per (row, 4-element block): the block is one Philox4x32-10 call, so every thread
 * draws exactly the four Gaussians its four elements need. Grid: x over blocks of a row, y over
 * rows (grid-stride in both), IGK_THREADS threads per block. Both builds compile without FMA
 * contraction (nvcc/NVRTC --fmad=false), so the float32 maths rounds like the reference's separate
 * PyTorch operations.
 *
 * The entry points are extern "C" with fixed names, one per (dtype, vectorised) instantiation, so
 * that a module compiled by NVRTC exposes them without name mangling. The list of names is
 * igengine/kernels/nvrtc.py:KERNELS (tests/test_nvrtc.py checks both lists agree).
 */
#ifndef IGK_KERNELS_CUH
#define IGK_KERNELS_CUH

#include "igk_math.h"

#define IGK_THREADS 256

#if defined(IGK_PARAMS_SIZE) /* the NVRTC build: the layout igengine/kernels/abi.py passes pointers to */
static_assert(IGK_ABI_VERSION == IGK_ABI_VERSION_EXPECTED, "csrc/igk_api.h and igengine/kernels/abi.py differ");
static_assert(sizeof(igk_step_params) == IGK_PARAMS_SIZE, "igk_step_params differs from abi.StepParams");
static_assert(sizeof(igk_step_buffers) == IGK_BUFFERS_SIZE, "igk_step_buffers differs from abi.StepBuffers");
static_assert(sizeof(igk_step_table) == IGK_TABLE_SIZE, "igk_step_table differs from abi.StepTable");
#endif

/* ---- bodies ------------------------------------------------------------------------------------ */

template <int DT, bool VEC>
__device__ __forceinline__ void igk_step_body(const igk_step_params& p, const igk_step_buffers& b) {
    const int64_t blocks = (b.e + 3) >> 2;
    for (int64_t n = blockIdx.y; n < b.n; n += gridDim.y)
        for (int64_t blk = (int64_t)blockIdx.x * IGK_THREADS + threadIdx.x; blk < blocks;
             blk += (int64_t)gridDim.x * IGK_THREADS)
            igk_step_block<DT, VEC>(p, b, n, blk);
}

/* The indexed step: thread 0 of every thread block reads the counter and the scalars into shared
 * memory and checks them (igk_launch_fault); a refused launch writes nothing but the fault word
 * (block (0, 0) only). The decision is uniform per block, so the early return is safe. */
template <int DT, bool VEC>
__device__ __forceinline__ void igk_step_indexed_body(const igk_step_table& t, const igk_step_buffers& b) {
    __shared__ igk_step_params sp;
    __shared__ int fault;
    if (threadIdx.x == 0) {
        const int64_t k = *t.counter;
        int f = (k < 0 || k >= t.count) ? IGK_FAULT_COUNTER : IGK_FAULT_NONE;
        if (f == IGK_FAULT_NONE) {
            sp = t.params[k];
            f = igk_launch_fault(sp, b, t.v_rows, t.net_rows);
        }
        fault = f;
        if (f != IGK_FAULT_NONE && blockIdx.x == 0 && blockIdx.y == 0 && t.fault && t.fault[0] == IGK_FAULT_NONE) {
            t.fault[0] = f;
            t.fault[1] = k;
        }
    }
    __syncthreads();
    if (fault != IGK_FAULT_NONE) return;
    const igk_step_params p = sp;
    const igk_step_buffers bk = igk_select_buffers(p, b);
    igk_step_body<DT, VEC>(p, bk);
}

/* ---- entry points ------------------------------------------------------------------------------ */

#define IGK_STEP_KERNEL(NAME, DT, VEC)                                                                  \
    __global__ void __launch_bounds__(IGK_THREADS) NAME(const igk_step_params p, const igk_step_buffers b) { \
        igk_step_body<DT, VEC>(p, b);                                                                   \
    }
#define IGK_STEP_INDEXED_KERNEL(NAME, DT, VEC)                                                          \
    __global__ void __launch_bounds__(IGK_THREADS) NAME(const igk_step_table t, const igk_step_buffers b) { \
        igk_step_indexed_body<DT, VEC>(t, b);                                                           \
    }

extern "C" {

IGK_STEP_KERNEL(igk_k_step_f32, IGK_DTYPE_F32, false)
IGK_STEP_KERNEL(igk_k_step_f32_vec, IGK_DTYPE_F32, true)
IGK_STEP_KERNEL(igk_k_step_bf16, IGK_DTYPE_BF16, false)
IGK_STEP_KERNEL(igk_k_step_bf16_vec, IGK_DTYPE_BF16, true)
IGK_STEP_KERNEL(igk_k_step_f16, IGK_DTYPE_F16, false)
IGK_STEP_KERNEL(igk_k_step_f16_vec, IGK_DTYPE_F16, true)

IGK_STEP_INDEXED_KERNEL(igk_k_step_indexed_f32, IGK_DTYPE_F32, false)
IGK_STEP_INDEXED_KERNEL(igk_k_step_indexed_f32_vec, IGK_DTYPE_F32, true)
IGK_STEP_INDEXED_KERNEL(igk_k_step_indexed_bf16, IGK_DTYPE_BF16, false)
IGK_STEP_INDEXED_KERNEL(igk_k_step_indexed_bf16_vec, IGK_DTYPE_BF16, true)
IGK_STEP_INDEXED_KERNEL(igk_k_step_indexed_f16, IGK_DTYPE_F16, false)
IGK_STEP_INDEXED_KERNEL(igk_k_step_indexed_f16_vec, IGK_DTYPE_F16, true)

/* Launched after an indexed step on the same stream, so it runs once every reader is done. */
__global__ void igk_k_advance(int64_t* counter) { *counter += 1; }

__global__ void __launch_bounds__(IGK_THREADS) igk_k_gaussian(uint64_t seed, uint32_t stream, const int64_t* indices,
                                                              int64_t n, int64_t numel, float* out) {
    const int64_t blocks = (numel + 3) >> 2;
    for (int64_t r = blockIdx.y; r < n; r += gridDim.y)
        for (int64_t blk = (int64_t)blockIdx.x * IGK_THREADS + threadIdx.x; blk < blocks;
             blk += (int64_t)gridDim.x * IGK_THREADS)
            igk_gaussian_block(seed, stream, indices, numel, out, r, blk);
}

__global__ void __launch_bounds__(IGK_THREADS) igk_k_philox(uint64_t seed, uint32_t stream, const int64_t* indices,
                                                            int64_t n, int64_t blocks, uint32_t* out) {
    for (int64_t r = blockIdx.y; r < n; r += gridDim.y)
        for (int64_t blk = (int64_t)blockIdx.x * IGK_THREADS + threadIdx.x; blk < blocks;
             blk += (int64_t)gridDim.x * IGK_THREADS)
            igk_noise_words((uint32_t)seed, (uint32_t)(seed >> 32), (uint64_t)blk, stream, (uint64_t)indices[r],
                            out + (r * blocks + blk) * 4);
}

}  // extern "C"

#endif /* IGK_KERNELS_CUH */
