/*
 * igk_cuda.cu -- CUDA kernels of the fused step and the noise contract, and their launchers.
 *
 * One thread per (row, 4-element block): the block is one Philox4x32-10 call, so every thread
 * draws exactly the four Gaussians its four elements need. Grid: x over blocks of a row, y over
 * rows (grid-stride in both). Launches go on the caller's stream; nothing allocates, copies or
 * synchronises, so a launch can be captured in a CUDA graph. The indexed step reads its scalars from
 * a device table at a device counter and a one-thread kernel advances the counter after it, so one
 * captured launch replays every step of a plan. Compiled with --fmad=false so that
 * the float32 maths rounds exactly like the reference's separate PyTorch operations.
 */
#include <cuda_runtime.h>

#include <algorithm>

#include "igk_common.h"
#include "igk_math.h"

#ifndef IGK_CUDA_ARCHS
#define IGK_CUDA_ARCHS "unknown"
#endif

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridX = int64_t(1) << 30;
constexpr int64_t kMaxGridY = 65535;

template <int DT, bool VEC>
__global__ void __launch_bounds__(kThreads) step_kernel(const igk_step_params p, const igk_step_buffers b) {
    const int64_t blocks = (b.e + 3) >> 2;
    for (int64_t n = blockIdx.y; n < b.n; n += gridDim.y)
        for (int64_t blk = (int64_t)blockIdx.x * kThreads + threadIdx.x; blk < blocks; blk += (int64_t)gridDim.x * kThreads)
            igk_step_block<DT, VEC>(p, b, n, blk);
}

/* The indexed step: thread 0 of every thread block reads the counter and the scalars into shared
 * memory and checks them (igk_launch_fault); a refused launch writes nothing but the fault word
 * (block (0, 0) only). The decision is uniform per block, so the early return is safe. */
template <int DT, bool VEC>
__global__ void __launch_bounds__(kThreads) step_indexed_kernel(const igk_step_table t, const igk_step_buffers b) {
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
    const int64_t blocks = (b.e + 3) >> 2;
    for (int64_t n = blockIdx.y; n < b.n; n += gridDim.y)
        for (int64_t blk = (int64_t)blockIdx.x * kThreads + threadIdx.x; blk < blocks; blk += (int64_t)gridDim.x * kThreads)
            igk_step_block<DT, VEC>(p, bk, n, blk);
}

/* Launched after step_indexed_kernel on the same stream, so it runs once every reader is done. */
__global__ void advance_kernel(int64_t* counter) { *counter += 1; }

__global__ void __launch_bounds__(kThreads) gaussian_kernel(uint64_t seed, uint32_t stream, const int64_t* indices,
                                                            int64_t n, int64_t numel, float* out) {
    const int64_t blocks = (numel + 3) >> 2;
    for (int64_t r = blockIdx.y; r < n; r += gridDim.y)
        for (int64_t blk = (int64_t)blockIdx.x * kThreads + threadIdx.x; blk < blocks; blk += (int64_t)gridDim.x * kThreads)
            igk_gaussian_block(seed, stream, indices, numel, out, r, blk);
}

__global__ void __launch_bounds__(kThreads) philox_kernel(uint64_t seed, uint32_t stream, const int64_t* indices,
                                                          int64_t n, int64_t blocks, uint32_t* out) {
    for (int64_t r = blockIdx.y; r < n; r += gridDim.y)
        for (int64_t blk = (int64_t)blockIdx.x * kThreads + threadIdx.x; blk < blocks; blk += (int64_t)gridDim.x * kThreads)
            igk_noise_words((uint32_t)seed, (uint32_t)(seed >> 32), (uint64_t)blk, stream, (uint64_t)indices[r],
                            out + (r * blocks + blk) * 4);
}

dim3 grid_for(int64_t rows, int64_t blocks) {
    const int64_t gx = std::min<int64_t>((blocks + kThreads - 1) / kThreads, kMaxGridX);
    const int64_t gy = std::min<int64_t>(rows, kMaxGridY);
    return dim3((unsigned)gx, (unsigned)gy, 1);
}

bool is_arch_error(cudaError_t e) {
    return e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction ||
           e == cudaErrorUnsupportedPtxVersion || e == cudaErrorInvalidPtx;
}

int cuda_fail(cudaError_t e, const char* what) {
    return igk::fail(is_arch_error(e) ? IGK_ERR_ARCH : IGK_ERR_CUDA, "%s: %s (%s)", what, cudaGetErrorString(e),
                     cudaGetErrorName(e));
}

/* Makes `device` current for the launch and restores the caller's device afterwards. The driver's
 * current context is shared with every other CUDA runtime in the process (e.g. PyTorch's). */
class DeviceGuard {
   public:
    explicit DeviceGuard(int device) : device_(device) {
        status_ = cudaGetDevice(&prev_);
        if (status_ == cudaSuccess && prev_ != device_) status_ = cudaSetDevice(device_);
    }
    ~DeviceGuard() {
        if (status_ == cudaSuccess && prev_ != device_) cudaSetDevice(prev_);
    }
    cudaError_t status() const { return status_; }

   private:
    int device_;
    int prev_ = -1;
    cudaError_t status_;
};

template <int DT, bool VEC>
void launch_step(const igk_step_params& p, const igk_step_buffers& b, cudaStream_t s) {
    step_kernel<DT, VEC><<<grid_for(b.n, igk::num_blocks(b.e)), kThreads, 0, s>>>(p, b);
}

template <int DT>
void launch_dtype(const igk_step_params& p, const igk_step_buffers& b, cudaStream_t s) {
    if (igk::can_vectorise(&b))
        launch_step<DT, true>(p, b, s);
    else
        launch_step<DT, false>(p, b, s);
}

template <int DT, bool VEC>
void launch_indexed(const igk_step_table& t, const igk_step_buffers& b, cudaStream_t s) {
    step_indexed_kernel<DT, VEC><<<grid_for(b.n, igk::num_blocks(b.e)), kThreads, 0, s>>>(t, b);
}

/* The vectorised path is chosen on the host from every pointer of b (a kind that drops some of
 * them can only be more aligned), so both paths compute the same bits anyway. */
template <int DT>
void launch_indexed_dtype(const igk_step_table& t, const igk_step_buffers& b, cudaStream_t s) {
    if (igk::can_vectorise(&b))
        launch_indexed<DT, true>(t, b, s);
    else
        launch_indexed<DT, false>(t, b, s);
}

template <typename K>
cudaError_t probe_one(K kernel) {
    cudaFuncAttributes attr;
    return cudaFuncGetAttributes(&attr, kernel);
}

}  // namespace

extern "C" {

IGK_EXPORT int igk_abi_version(void) { return IGK_ABI_VERSION; }
IGK_EXPORT int igk_params_size(void) { return (int)sizeof(igk_step_params); }
IGK_EXPORT int igk_buffers_size(void) { return (int)sizeof(igk_step_buffers); }
IGK_EXPORT int igk_table_size(void) { return (int)sizeof(igk_step_table); }
IGK_EXPORT const char* igk_build_info(void) { return "cuda " IGK_CUDA_ARCHS; }
IGK_EXPORT const char* igk_last_error(void) { return igk::error_buffer(); }

IGK_EXPORT int igk_cuda_probe(int device) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) return cuda_fail(e, "cudaGetDeviceCount");
    if (device < 0 || device >= count) return igk::fail(IGK_ERR_CUDA, "device %d out of range (%d devices)", device, count);
    DeviceGuard guard(device);
    if (guard.status() != cudaSuccess) return cuda_fail(guard.status(), "cudaSetDevice");
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    /* Loads every kernel now (lazy module loading would otherwise do it inside a graph capture). */
    const cudaError_t errs[] = {
        probe_one(step_kernel<IGK_DTYPE_F32, true>),  probe_one(step_kernel<IGK_DTYPE_F32, false>),
        probe_one(step_kernel<IGK_DTYPE_BF16, true>), probe_one(step_kernel<IGK_DTYPE_BF16, false>),
        probe_one(step_kernel<IGK_DTYPE_F16, true>),  probe_one(step_kernel<IGK_DTYPE_F16, false>),
        probe_one(step_indexed_kernel<IGK_DTYPE_F32, true>),  probe_one(step_indexed_kernel<IGK_DTYPE_F32, false>),
        probe_one(step_indexed_kernel<IGK_DTYPE_BF16, true>), probe_one(step_indexed_kernel<IGK_DTYPE_BF16, false>),
        probe_one(step_indexed_kernel<IGK_DTYPE_F16, true>),  probe_one(step_indexed_kernel<IGK_DTYPE_F16, false>),
        probe_one(advance_kernel),
        probe_one(gaussian_kernel),                   probe_one(philox_kernel),
    };
    for (cudaError_t err : errs) {
        if (err != cudaSuccess) {
            cudaGetLastError(); /* clear the sticky copy */
            return igk::fail(is_arch_error(err) ? IGK_ERR_ARCH : IGK_ERR_CUDA,
                             "built for %s, device %d is sm_%d%d: %s", IGK_CUDA_ARCHS, device, major, minor,
                             cudaGetErrorString(err));
        }
    }
    return igk::ok();
}

IGK_EXPORT int igk_cuda_step(const igk_step_params* p, const igk_step_buffers* b, int device, void* stream) {
    const int status = igk::validate(p, b);
    if (status != IGK_OK) return status;
    DeviceGuard guard(device);
    if (guard.status() != cudaSuccess) return cuda_fail(guard.status(), "cudaSetDevice");
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    switch (b->v_dtype) {
        case IGK_DTYPE_F32: launch_dtype<IGK_DTYPE_F32>(*p, *b, s); break;
        case IGK_DTYPE_BF16: launch_dtype<IGK_DTYPE_BF16>(*p, *b, s); break;
        default: launch_dtype<IGK_DTYPE_F16>(*p, *b, s); break;
    }
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? igk::ok() : cuda_fail(e, "fused step launch");
}

IGK_EXPORT int igk_cuda_step_indexed(const igk_step_table* t, const igk_step_buffers* b, int device, void* stream) {
    const int status = igk::validate_indexed(t, b);
    if (status != IGK_OK) return status;
    DeviceGuard guard(device);
    if (guard.status() != cudaSuccess) return cuda_fail(guard.status(), "cudaSetDevice");
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    switch (b->v_dtype) {
        case IGK_DTYPE_F32: launch_indexed_dtype<IGK_DTYPE_F32>(*t, *b, s); break;
        case IGK_DTYPE_BF16: launch_indexed_dtype<IGK_DTYPE_BF16>(*t, *b, s); break;
        default: launch_indexed_dtype<IGK_DTYPE_F16>(*t, *b, s); break;
    }
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return cuda_fail(e, "indexed fused step launch");
    advance_kernel<<<1, 1, 0, s>>>(t->counter);
    e = cudaGetLastError();
    return e == cudaSuccess ? igk::ok() : cuda_fail(e, "counter advance launch");
}

IGK_EXPORT int igk_cuda_philox(uint64_t seed, uint32_t stream, const int64_t* indices, int64_t n, int64_t blocks,
                               uint32_t* out, int device, void* cuda_stream) {
    if (!indices || !out) return igk::fail(IGK_ERR_NULL, "indices and out must not be NULL");
    if (n <= 0 || blocks <= 0) return igk::fail(IGK_ERR_SIZE, "n and blocks must be > 0");
    DeviceGuard guard(device);
    if (guard.status() != cudaSuccess) return cuda_fail(guard.status(), "cudaSetDevice");
    philox_kernel<<<grid_for(n, blocks), kThreads, 0, static_cast<cudaStream_t>(cuda_stream)>>>(seed, stream, indices, n,
                                                                                              blocks, out);
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? igk::ok() : cuda_fail(e, "philox launch");
}

IGK_EXPORT int igk_cuda_gaussian(uint64_t seed, uint32_t stream, const int64_t* indices, int64_t n, int64_t numel,
                                 float* out, int device, void* cuda_stream) {
    if (!indices || !out) return igk::fail(IGK_ERR_NULL, "indices and out must not be NULL");
    if (n <= 0 || numel <= 0) return igk::fail(IGK_ERR_SIZE, "n and numel must be > 0");
    DeviceGuard guard(device);
    if (guard.status() != cudaSuccess) return cuda_fail(guard.status(), "cudaSetDevice");
    gaussian_kernel<<<grid_for(n, igk::num_blocks(numel)), kThreads, 0, static_cast<cudaStream_t>(cuda_stream)>>>(
        seed, stream, indices, n, numel, out);
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? igk::ok() : cuda_fail(e, "gaussian launch");
}

}  // extern "C"
