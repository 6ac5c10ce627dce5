/*
 * igk_cuda.cu -- the host launchers of the CUDA kernels (the CMake/nvcc build of
 * libigengine_kernels_cuda). The kernels themselves are igk_kernels.cuh, device code shared
 * verbatim with the NVRTC build (igengine/kernels/nvrtc.py), so both builds run the same text.
 *
 * Launches go on the caller's stream; nothing allocates, copies or synchronises, so a launch can
 * be captured in a CUDA graph. The indexed step reads its scalars from a device table at a device
 * counter and a one-thread kernel advances the counter after it, so one captured launch replays
 * every step of a plan. Compiled with --fmad=false so that the float32 maths rounds exactly like
 * the reference's separate PyTorch operations.
 */
#include <cuda_runtime.h>

#include <algorithm>

#include "igk_common.h"
#include "igk_kernels.cuh"

#ifndef IGK_CUDA_ARCHS
#define IGK_CUDA_ARCHS "unknown"
#endif

namespace {

constexpr int kThreads = IGK_THREADS;
constexpr int64_t kMaxGridX = int64_t(1) << 30;
constexpr int64_t kMaxGridY = 65535;

typedef void (*step_fn)(const igk_step_params, const igk_step_buffers);
typedef void (*step_indexed_fn)(const igk_step_table, const igk_step_buffers);

/* [dtype][vectorised] */
const step_fn kStep[3][2] = {{igk_k_step_f32, igk_k_step_f32_vec},
                             {igk_k_step_bf16, igk_k_step_bf16_vec},
                             {igk_k_step_f16, igk_k_step_f16_vec}};
const step_indexed_fn kStepIndexed[3][2] = {{igk_k_step_indexed_f32, igk_k_step_indexed_f32_vec},
                                            {igk_k_step_indexed_bf16, igk_k_step_indexed_bf16_vec},
                                            {igk_k_step_indexed_f16, igk_k_step_indexed_f16_vec}};

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
        probe_one(kStep[0][0]),        probe_one(kStep[0][1]),        probe_one(kStep[1][0]),
        probe_one(kStep[1][1]),        probe_one(kStep[2][0]),        probe_one(kStep[2][1]),
        probe_one(kStepIndexed[0][0]), probe_one(kStepIndexed[0][1]), probe_one(kStepIndexed[1][0]),
        probe_one(kStepIndexed[1][1]), probe_one(kStepIndexed[2][0]), probe_one(kStepIndexed[2][1]),
        probe_one(igk_k_advance),      probe_one(igk_k_gaussian),     probe_one(igk_k_philox),
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
    kStep[b->v_dtype][igk::can_vectorise(b) ? 1 : 0]<<<grid_for(b->n, igk::num_blocks(b->e)), kThreads, 0, s>>>(*p, *b);
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? igk::ok() : cuda_fail(e, "fused step launch");
}

IGK_EXPORT int igk_cuda_step_indexed(const igk_step_table* t, const igk_step_buffers* b, int device, void* stream) {
    const int status = igk::validate_indexed(t, b);
    if (status != IGK_OK) return status;
    DeviceGuard guard(device);
    if (guard.status() != cudaSuccess) return cuda_fail(guard.status(), "cudaSetDevice");
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    /* The vectorised path is chosen on the host from every pointer of b (a kind that drops some of
     * them can only be more aligned), so both paths compute the same bits anyway. */
    kStepIndexed[b->v_dtype][igk::can_vectorise(b) ? 1 : 0]<<<grid_for(b->n, igk::num_blocks(b->e)), kThreads, 0, s>>>(
        *t, *b);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return cuda_fail(e, "indexed fused step launch");
    igk_k_advance<<<1, 1, 0, s>>>(t->counter);
    e = cudaGetLastError();
    return e == cudaSuccess ? igk::ok() : cuda_fail(e, "counter advance launch");
}

IGK_EXPORT int igk_cuda_philox(uint64_t seed, uint32_t stream, const int64_t* indices, int64_t n, int64_t blocks,
                               uint32_t* out, int device, void* cuda_stream) {
    if (!indices || !out) return igk::fail(IGK_ERR_NULL, "indices and out must not be NULL");
    if (n <= 0 || blocks <= 0) return igk::fail(IGK_ERR_SIZE, "n and blocks must be > 0");
    DeviceGuard guard(device);
    if (guard.status() != cudaSuccess) return cuda_fail(guard.status(), "cudaSetDevice");
    igk_k_philox<<<grid_for(n, blocks), kThreads, 0, static_cast<cudaStream_t>(cuda_stream)>>>(seed, stream, indices, n,
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
    igk_k_gaussian<<<grid_for(n, igk::num_blocks(numel)), kThreads, 0, static_cast<cudaStream_t>(cuda_stream)>>>(
        seed, stream, indices, n, numel, out);
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? igk::ok() : cuda_fail(e, "gaussian launch");
}

}  // extern "C"
