/*
 * igk_api.h -- the C ABI of igengine's fused guidance + solver-update step (plain C, no CUDA types).
 *
 * Two shared libraries export it:
 *   libigengine_kernels_cpu   (igk_cpu_*  : the CPU twin, always built)
 *   libigengine_kernels_cuda  (igk_cuda_* : the CUDA kernels, built when nvcc is found)
 * Both run the per-element code of igk_math.h, so they compute the same numbers.
 * Python binds it with ctypes (igengine/kernels/binding.py); any framework that can hand out raw
 * pointers and a cudaStream_t (PyTorch, ONNX Runtime IOBinding, TensorRT, CuPy) can call it.
 *
 * Layout: every buffer is dense row-major. One row per sample (N rows) or per network row
 * (R = N, or 2N with CFG: rows 0..N-1 conditional, N..2N-1 unconditional), E elements per row
 * (E = C*H*W in C order). The state x and every output are float32.
 *
 * Whenever this header changes incompatibly, bump IGK_ABI_VERSION (Python checks it on load).
 */
#ifndef IGK_API_H
#define IGK_API_H

#if defined(__CUDACC_RTC__)
/* NVRTC (igengine/kernels/nvrtc.py) has no system headers: the fixed-width types of the ABI, for
 * the device's LP64 data model (the sizes igk_*_size() and the Python binding check). */
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
typedef unsigned long long uintptr_t;
#else
#include <stdint.h>
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define IGK_ABI_VERSION 3

#if defined(_WIN32)
#define IGK_EXPORT __declspec(dllexport)
#else
#define IGK_EXPORT __attribute__((visibility("default")))
#endif

/* What one launch does (a Heun step is two launches around the second network call). */
enum igk_kind {
    IGK_KIND_SDE = 0,          /* SiT Euler-Maruyama: x + d dt + sqrt(2t) (eps sqrt|dt|), in-kernel Philox eps */
    IGK_KIND_SDE_LAST = 1,     /* SiT last SDE step, mean only: x + dt d */
    IGK_KIND_EULER = 2,        /* x + dt v (SiT ode-euler, LightningDiT euler, RAEv2: v from the x-prediction) */
    IGK_KIND_HEUN_PREDICT = 3, /* k1 = v; x_pred = x + dt k1 (writes k1_out, net_out = x_pred rows) */
    IGK_KIND_HEUN_CORRECT = 4  /* k2 = v; x + dt (k1/2 + k2/2) in the family's order of operations */
};

/* The model family: selects the IG form, whether the guided field is an x-prediction (RAEv2) and the
 * kinds a launch may have (the SDE drift is SiT's; RAEv2 steps are Euler steps). */
enum igk_family { IGK_FAMILY_SIT = 0, IGK_FAMILY_LIGHTNINGDIT = 1, IGK_FAMILY_RAEV2 = 2 };

/* Element type of the network outputs v_final / v_inter (upcast to float32 on load). */
enum igk_dtype { IGK_DTYPE_F32 = 0, IGK_DTYPE_BF16 = 1, IGK_DTYPE_F16 = 2 };

enum igk_status {
    IGK_OK = 0,
    IGK_ERR_NULL = 1,     /* a buffer the kind needs is NULL */
    IGK_ERR_SIZE = 2,     /* n or e out of range */
    IGK_ERR_DTYPE = 3,    /* unknown v_dtype */
    IGK_ERR_KIND = 4,     /* unknown kind or family, or flags that contradict the kind */
    IGK_ERR_CUDA = 5,     /* a CUDA runtime error (igk_last_error() has the text) */
    IGK_ERR_ARCH = 6      /* the library holds no code for this GPU */
};

/* Why an indexed launch ran nothing (igk_step_table.fault[0]; the device cannot return a status). */
enum igk_fault {
    IGK_FAULT_NONE = 0,
    IGK_FAULT_COUNTER = 1, /* *counter is outside [0, count) */
    IGK_FAULT_KIND = 2,    /* unknown kind or family, or flags that contradict the kind */
    IGK_FAULT_ROWS = 3,    /* v_rows != (cfg ? 2n : n), or net_rows < 2n under dup_next */
    IGK_FAULT_NULL = 4     /* a buffer the launch's kind needs is NULL */
};

/*
 * Per-step scalars, computed once per step on the host in float64 and rounded to float32 exactly as
 * PyTorch rounds a Python scalar that multiplies a float32 tensor. igk_*_step passes them by value
 * (a captured launch then replays that one step); igk_*_step_indexed reads them from a table
 * indexed by a device counter (one captured launch serves every step: igk_step_table).
 */
typedef struct igk_step_params {
    int32_t kind;           /* enum igk_kind */
    int32_t family;         /* enum igk_family: the IG form, RAEv2's x-prediction velocity, the kinds allowed */
    int32_t ig;             /* 1: IG is active at this evaluation */
    int32_t cfg;            /* 1: v has 2N rows and CFG mixes them */
    int32_t drift;          /* 1: SiT SDE, the field is the drift v - t score (uses the row's x) */
    int32_t dup_next;       /* 1: net_out gets 2N rows (next evaluation inside the CFG interval) */
    int32_t step_index;     /* written into first_bad[n] when row n turns non-finite */
    uint32_t noise_stream;  /* Philox stream of this step's noise (IGK_KIND_SDE only) */
    uint32_t seed_lo;       /* seed mod 2^32 */
    uint32_t seed_hi;       /* seed div 2^32 */
    float ig_w;             /* IG weight of the conditional rows (of every row without CFG). SiT, RAEv2: w_ig
                             * (v_i + w (v_f - v_i)); LightningDiT: w_ig - 1 (v_f + (w-1)(v_f - v_i)) */
    float ig_w_uncond;      /* IG weight of the unconditional rows N..2N-1 under CFG, in ig_w's form. RAEv2: its
                             * unconditional scale; SiT, LightningDiT: the host sets it equal to ig_w */
    float cfg_w;            /* w_cfg: u + w (c - u) */
    float score_ratio;      /* SiT score: (ratio v - x) / var, ratio = (1 - t) / -1 */
    float score_var;        /* var = t^2 - ratio t */
    float drift_t;          /* 0.5 g^2 = 0.5 (2 t) */
    float dt;               /* t_next - t_cur */
    float sqrt_abs_dt;      /* sqrt(|dt|) */
    float sqrt_diffusion;   /* sqrt(2 t) */
    float t_safe;           /* RAEv2: v = (x - x_hat) / t_safe, t_safe = max(t, 0.05) in float32 (a true
                             * division); 0 for the other families (unused) */
} igk_step_params;

/*
 * Buffers of one launch. x_out may equal x (in-place update); no other two buffers may overlap.
 *   x          float32 [N, E]   state at t_cur (required)
 *   v_final    v_dtype [R, E]   network output (required), R = 2N if cfg else N (RAEv2: the full x-prediction)
 *   v_inter    v_dtype [R, E]   intermediate (IG) output; read only when ig (RAEv2: the base x-prediction)
 *   k1_in      float32 [N, E]   predictor slope; required by HEUN_CORRECT
 *   indices    int64   [N]      sample index of each row; required by SDE
 *   x_out      float32 [N, E]   next state; required except by HEUN_PREDICT (there: x_pred, optional)
 *   k1_out     float32 [N, E]   predictor slope; required by HEUN_PREDICT
 *   net_out    float32 [N or 2N, E]  next network input (x_out, or x_pred, duplicated when dup_next); optional
 *   first_bad  int64   [N]      set to step_index where a row of x_out turns NaN/Inf and it is < 0; optional
 *
 * An indexed launch (igk_*_step_indexed) gets every buffer any kind of its plan needs, with
 * k1_in == k1_out allowed (the one slope buffer), and uses per kind only (igk_select_buffers):
 *   SDE            x, v_final, v_inter if ig, indices, x_out, net_out, first_bad
 *   SDE_LAST/EULER x, v_final, v_inter if ig, x_out, net_out, first_bad
 *   HEUN_PREDICT   x, v_final, v_inter if ig, k1_out, net_out   (x_out is ignored: x stays the state)
 *   HEUN_CORRECT   x, v_final, v_inter if ig, k1_in, x_out, net_out, first_bad
 */
typedef struct igk_step_buffers {
    const float* x;
    const void* v_final;
    const void* v_inter;
    const float* k1_in;
    const int64_t* indices;
    float* x_out;
    float* k1_out;
    float* net_out;
    int64_t* first_bad;
    int64_t n;
    int64_t e;
    int32_t v_dtype;   /* enum igk_dtype */
    int32_t reserved;  /* 0 */
} igk_step_buffers;

/*
 * The per-launch scalars of a whole plan, for indexed launches: the launch runs params[*counter],
 * then advances *counter by one. Read on the device (CUDA) or host (CPU twin), so one captured
 * launch serves every launch of the plan.
 *   params    igk_step_params [count], in the memory of the launch (device memory for CUDA)
 *   counter   int64 [1], same memory: index of the launch to run; incremented after the launch
 *   fault     int64 [2], same memory, optional: {enum igk_fault, counter value} of the first launch
 *             that was refused (written only while fault[0] == 0)
 *   v_rows    rows of v_final / v_inter in the buffers (N or 2N)
 *   net_rows  rows of net_out (N or 2N; 0 when net_out is NULL)
 */
typedef struct igk_step_table {
    const igk_step_params* params;
    int64_t* counter;
    int64_t* fault;
    int64_t count;
    int64_t v_rows;
    int64_t net_rows;
} igk_step_table;

#if !defined(__CUDACC_RTC__) /* the host entry points; NVRTC compiles only the kernels (igk_kernels.cuh) */
/* ---- both libraries ---------------------------------------------------------------------------- */
IGK_EXPORT int igk_abi_version(void);
IGK_EXPORT int igk_params_size(void);   /* sizeof(igk_step_params), checked against the binding */
IGK_EXPORT int igk_buffers_size(void);  /* sizeof(igk_step_buffers) */
IGK_EXPORT int igk_table_size(void);    /* sizeof(igk_step_table) */
IGK_EXPORT const char* igk_build_info(void);
IGK_EXPORT const char* igk_last_error(void); /* text of the calling thread's last error */

/* ---- CPU twin (host pointers) ------------------------------------------------------------------ */
/* num_threads <= 0: one thread per hardware core for large launches. Returns enum igk_status. */
IGK_EXPORT int igk_cpu_step(const igk_step_params* p, const igk_step_buffers* b, int num_threads);
/* Runs t->params[*t->counter] on b, then ++*t->counter (also when the launch is refused: then the
 * return value says why, and t->fault records it as on the device). */
IGK_EXPORT int igk_cpu_step_indexed(const igk_step_table* t, const igk_step_buffers* b, int num_threads);
/* Raw words of the noise contract: out uint32 [n, blocks, 4]. */
IGK_EXPORT int igk_cpu_philox(uint64_t seed, uint32_t stream, const int64_t* indices, int64_t n, int64_t blocks,
                              uint32_t* out);
/* Philox4x32-10 on arbitrary counters (known-answer tests): ctr uint32 [count, 4], key uint32 [count, 2],
 * out uint32 [count, 4]. */
IGK_EXPORT int igk_cpu_philox_raw(const uint32_t* ctr, const uint32_t* key, int64_t count, uint32_t* out);
/* Gaussians of the noise contract: out float32 [n, numel]. */
IGK_EXPORT int igk_cpu_gaussian(uint64_t seed, uint32_t stream, const int64_t* indices, int64_t n, int64_t numel,
                                float* out, int num_threads);

/* ---- CUDA (device pointers, the caller's stream; no host synchronisation, graph-capturable) ----- */
/* 0 when the kernels can run on `device`; else IGK_ERR_ARCH / IGK_ERR_CUDA with igk_last_error(). */
IGK_EXPORT int igk_cuda_probe(int device);
IGK_EXPORT int igk_cuda_step(const igk_step_params* p, const igk_step_buffers* b, int device, void* stream);
/* Enqueues two kernels on `stream`: the step with the scalars t->params[*t->counter] (read on the
 * device), then the advance ++*t->counter. Stream order makes the advance race-free: it starts
 * after every thread of the step has read the counter. A launch whose scalars do not fit b runs
 * nothing and records why in t->fault (the return value only covers what the host can check). */
IGK_EXPORT int igk_cuda_step_indexed(const igk_step_table* t, const igk_step_buffers* b, int device, void* stream);
IGK_EXPORT int igk_cuda_philox(uint64_t seed, uint32_t stream, const int64_t* indices, int64_t n, int64_t blocks,
                               uint32_t* out, int device, void* cuda_stream);
IGK_EXPORT int igk_cuda_gaussian(uint64_t seed, uint32_t stream, const int64_t* indices, int64_t n, int64_t numel,
                                 float* out, int device, void* cuda_stream);
#endif /* !__CUDACC_RTC__ */

#ifdef __cplusplus
}
#endif

#endif /* IGK_API_H */
