/*
 * igk_math.h -- the per-element maths of igengine's fused step, shared verbatim by the CUDA kernels
 * (igk_cuda.cu) and their CPU twin (igk_cpu.cpp).
 *
 * Every function is `IGK_HD inline`: __host__ __device__ under nvcc, plain inline for the host
 * compiler. Both translation units are compiled without floating-point contraction
 * (-ffp-contract=off, nvcc --fmad=false) so that each float32 operation below rounds once, in the
 * order the reference PyTorch code (igengine/sampling/: guidance.py, updates.py, loop.py) performs it.
 *
 * Contents
 *   Philox4x32-10 and the Box-Muller of the noise contract (igengine/noise.py);
 *   bf16 / fp16 -> float32 conversion (exact);
 *   IG, the SiT SDE drift, CFG, RAEv2's x-prediction velocity and the solver updates, on one element;
 *   igk_step_block: one 4-element block of one row = one Philox call, loads, maths, stores;
 *   igk_launch_fault / igk_select_buffers: the checks and per-kind buffers of an indexed launch.
 */
#ifndef IGK_MATH_H
#define IGK_MATH_H

#if !defined(__CUDACC_RTC__) /* NVRTC: sqrt/log/cos/sin are built in, memcpy is host-only below */
#include <math.h>
#include <stdint.h>
#include <string.h>
#endif

#include "igk_api.h"

#if defined(__CUDACC__)
#define IGK_HD __host__ __device__
#else
#define IGK_HD
#endif

/* ---------------------------------------------------------------------------------------------
 * Philox4x32-10 (Salmon et al., SC'11). key = (k0, k1), counter = (c0, c1, c2, c3).
 * Round: (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)),
 * the key bumped by the Weyl constants before every round but the first.
 * ------------------------------------------------------------------------------------------- */
IGK_HD inline void igk_philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                                     uint32_t out[4]) {
    for (int r = 0; r < 10; ++r) {
        if (r) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const uint64_t p0 = (uint64_t)0xD2511F53u * (uint64_t)c0;
        const uint64_t p1 = (uint64_t)0xCD9E8D57u * (uint64_t)c2;
        const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)p1;
        c3 = (uint32_t)p0;
        c0 = n0;
        c2 = n2;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
}

/* The contract's counter for (block, stream, sample index) under key (seed lo, seed hi). */
IGK_HD inline void igk_noise_words(uint32_t seed_lo, uint32_t seed_hi, uint64_t block, uint32_t stream,
                                   uint64_t index, uint32_t out[4]) {
    igk_philox4x32_10((uint32_t)block, stream, (uint32_t)index, (uint32_t)(index >> 32), seed_lo, seed_hi, out);
}

/* u = (w + 0.5) / 2^32 in float64: never 0 or 1 (exact: w + 0.5 needs 33 bits). */
IGK_HD inline double igk_u01(uint32_t w) { return ((double)w + 0.5) * (1.0 / 4294967296.0); }

/* Box-Muller in float64, then rounded to float32: (w0, w1) -> g0, g1 and (w2, w3) -> g2, g3.
 * Written in the reference's order: r = sqrt(-2 ln u0), phi = (2 pi) u1, r cos(phi), r sin(phi). */
IGK_HD inline void igk_box_muller(const uint32_t w[4], float g[4]) {
    const double two_pi = 2.0 * 3.141592653589793;  /* 2.0 * np.pi */
    const double r01 = sqrt(-2.0 * log(igk_u01(w[0])));
    const double r23 = sqrt(-2.0 * log(igk_u01(w[2])));
    const double a01 = two_pi * igk_u01(w[1]);
    const double a23 = two_pi * igk_u01(w[3]);
    g[0] = (float)(r01 * cos(a01));
    g[1] = (float)(r01 * sin(a01));
    g[2] = (float)(r23 * cos(a23));
    g[3] = (float)(r23 * sin(a23));
}

/* ---------------------------------------------------------------------------------------------
 * Exact conversions to float32 (bit manipulation: identical on host and device).
 * ------------------------------------------------------------------------------------------- */
IGK_HD inline float igk_bits_f32(uint32_t b) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(b);
#else
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
#endif
}

IGK_HD inline uint32_t igk_f32_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    return b;
#endif
}

IGK_HD inline float igk_bf16_to_f32(uint16_t h) { return igk_bits_f32((uint32_t)h << 16); }

IGK_HD inline float igk_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t ex = (h >> 10) & 0x1Fu;
    const uint32_t man = h & 0x3FFu;
    if (ex == 0x1Fu) return igk_bits_f32(sign | 0x7F800000u | (man << 13)); /* Inf, NaN (payload kept) */
    if (ex == 0) {                                                        /* zero, subnormal: man 2^-24 */
        const float f = (float)man * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    return igk_bits_f32(sign | ((ex + 112u) << 23) | (man << 13)); /* rebias 15 -> 127 */
}

IGK_HD inline bool igk_finite(float f) { return (igk_f32_bits(f) & 0x7F800000u) != 0x7F800000u; }

/* first_bad[n] = step where row n first turned non-finite. Every writer of one launch stores the
 * same value and launches are ordered, so a relaxed check-then-store is exact (atomic on the host
 * to keep the twin's threads free of data races). */
IGK_HD inline void igk_flag_first_bad(int64_t* slot, int32_t step) {
#if defined(__CUDA_ARCH__) || !defined(__GNUC__)
    if (*slot < 0) *slot = step;
#else
    if (__atomic_load_n(slot, __ATOMIC_RELAXED) < 0) __atomic_store_n(slot, (int64_t)step, __ATOMIC_RELAXED);
#endif
}

/* Load 4 consecutive elements starting at element i of `base` (element type DT), m valid (1..4).
 * VEC: the caller guarantees m == 4 and 16-byte (fp32) / 8-byte (16-bit) alignment. */
template <int DT, bool VEC>
IGK_HD inline void igk_load4(const void* base, int64_t i, int m, float out[4]) {
    if (DT == IGK_DTYPE_F32) {
        const float* p = (const float*)base + i;
        if (VEC) {
#if defined(__CUDA_ARCH__)
            const float4 q = *(const float4*)p;
            out[0] = q.x; out[1] = q.y; out[2] = q.z; out[3] = q.w;
#else
            memcpy(out, p, 4 * sizeof(float));
#endif
        } else {
            for (int j = 0; j < 4; ++j) out[j] = j < m ? p[j] : 0.0f;
        }
        return;
    }
    const uint16_t* p = (const uint16_t*)base + i;
    uint16_t h[4] = {0, 0, 0, 0};
    if (VEC) {
#if defined(__CUDA_ARCH__)
        const uint2 q = *(const uint2*)p;
        h[0] = (uint16_t)(q.x & 0xFFFFu); h[1] = (uint16_t)(q.x >> 16);
        h[2] = (uint16_t)(q.y & 0xFFFFu); h[3] = (uint16_t)(q.y >> 16);
#else
        memcpy(h, p, 4 * sizeof(uint16_t));
#endif
    } else {
        for (int j = 0; j < m; ++j) h[j] = p[j];
    }
    for (int j = 0; j < 4; ++j) out[j] = DT == IGK_DTYPE_BF16 ? igk_bf16_to_f32(h[j]) : igk_f16_to_f32(h[j]);
}

template <bool VEC>
IGK_HD inline void igk_store4(float* base, int64_t i, int m, const float v[4]) {
    float* p = base + i;
    if (VEC) {
#if defined(__CUDA_ARCH__)
        *(float4*)p = make_float4(v[0], v[1], v[2], v[3]);
#else
        memcpy(p, v, 4 * sizeof(float));
#endif
    } else {
        for (int j = 0; j < m; ++j) p[j] = v[j];
    }
}

/* ---------------------------------------------------------------------------------------------
 * Guidance and solver maths on one element, float32, the reference's order of operations.
 * ------------------------------------------------------------------------------------------- */

/* IG (guidance.ig_combine) with weight w of the row's half (ig_w, or ig_w_uncond for rows N..2N-1):
 * SiT and RAEv2 v_i + w (v_f - v_i); LightningDiT v_f + w (v_f - v_i), its w being w_ig - 1. */
IGK_HD inline float igk_ig(float vf, float vi, float w, const igk_step_params& p) {
    if (p.family == IGK_FAMILY_LIGHTNINGDIT) return vf + w * (vf - vi);
    return vi + w * (vf - vi);
}

/* SiT SDE drift (updates.sit_drift): score = (ratio v - x) / var; d = v - (0.5 g^2) score. */
IGK_HD inline float igk_sit_drift(float v, float x, const igk_step_params& p) {
    const float score = (p.score_ratio * v - x) / p.score_var;
    return v - p.drift_t * score;
}

/* The guided field of one network row: IG with the half's weight w (if active), then the drift (SiT
 * SDE) or the row itself (v; RAEv2: the guided x-prediction, made a velocity after CFG). */
IGK_HD inline float igk_row_field(float vf, float vi, float x, float w, const igk_step_params& p) {
    const float v = p.ig ? igk_ig(vf, vi, w, p) : vf;
    return p.drift ? igk_sit_drift(v, x, p) : v;
}

/* CFG (guidance.cfg_combine): u + w (c - u). */
IGK_HD inline float igk_cfg(float c, float u, float w) { return u + w * (c - u); }

/* RAEv2 (updates.xpred_velocity): v = (x - x_hat) / t_safe, an IEEE division as the reference's
 * tensor division (not a multiplication by 1 / t_safe, which can differ in the last bit). */
IGK_HD inline float igk_xpred_velocity(float x, float x_hat, const igk_step_params& p) {
    return (x - x_hat) / p.t_safe;
}

/* updates.sde_update, stochastic step: (x + d dt) + sqrt(2t) (eps sqrt|dt|). */
IGK_HD inline float igk_sde(float x, float d, float eps, const igk_step_params& p) {
    return (x + d * p.dt) + p.sqrt_diffusion * (eps * p.sqrt_abs_dt);
}

/* updates.sde_update (last step), euler_update, heun_predict: x + dt f. */
IGK_HD inline float igk_euler(float x, float f, const igk_step_params& p) { return x + p.dt * f; }

/* updates.heun_correct: x + dt (0.5 k1 + 0.5 k2), the same bits in both families (0.5 k == k 0.5). */
IGK_HD inline float igk_heun_correct(float x, float k1, float k2, const igk_step_params& p) {
    return x + p.dt * (0.5f * k1 + 0.5f * k2);
}

/* ---------------------------------------------------------------------------------------------
 * One block: elements 4 blk .. 4 blk + 3 of row n (those < E), i.e. exactly one Philox call.
 * DT: element type of v_final / v_inter. VEC: E % 4 == 0 and every buffer suitably aligned.
 * ------------------------------------------------------------------------------------------- */
template <int DT, bool VEC>
IGK_HD inline void igk_step_block(const igk_step_params& p, const igk_step_buffers& b, int64_t n, int64_t blk) {
    const int64_t E = b.e;
    const int64_t e0 = blk * 4;
    const int m = (E - e0) < 4 ? (int)(E - e0) : 4;
    const int64_t ic = n * E + e0;  /* row n: state, conditional network row, outputs */

    float x[4], f[4], vf[4], vi[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    igk_load4<IGK_DTYPE_F32, VEC>(b.x, ic, m, x);
    igk_load4<DT, VEC>(b.v_final, ic, m, vf);
    if (p.ig) igk_load4<DT, VEC>(b.v_inter, ic, m, vi);
    for (int j = 0; j < 4; ++j) f[j] = igk_row_field(vf[j], vi[j], x[j], p.ig_w, p);

    if (p.cfg) {  /* unconditional row N + n, same x (the network saw x twice), its own IG weight */
        const int64_t iu = (b.n + n) * E + e0;
        igk_load4<DT, VEC>(b.v_final, iu, m, vf);
        if (p.ig) igk_load4<DT, VEC>(b.v_inter, iu, m, vi);
        for (int j = 0; j < 4; ++j) f[j] = igk_cfg(f[j], igk_row_field(vf[j], vi[j], x[j], p.ig_w_uncond, p), p.cfg_w);
    }
    if (p.family == IGK_FAMILY_RAEV2)  /* f is the guided x-prediction: the velocity at x */
        for (int j = 0; j < 4; ++j) f[j] = igk_xpred_velocity(x[j], f[j], p);

    float xn[4];
    switch (p.kind) {
        case IGK_KIND_SDE: {
            uint32_t w[4];
            float eps[4];
            igk_noise_words(p.seed_lo, p.seed_hi, (uint64_t)blk, p.noise_stream, (uint64_t)b.indices[n], w);
            igk_box_muller(w, eps);
            for (int j = 0; j < 4; ++j) xn[j] = igk_sde(x[j], f[j], eps[j], p);
            break;
        }
        case IGK_KIND_HEUN_PREDICT:
            igk_store4<VEC>(b.k1_out, ic, m, f);
            for (int j = 0; j < 4; ++j) xn[j] = igk_euler(x[j], f[j], p);
            break;
        case IGK_KIND_HEUN_CORRECT: {
            float k1[4];
            igk_load4<IGK_DTYPE_F32, VEC>(b.k1_in, ic, m, k1);
            for (int j = 0; j < 4; ++j) xn[j] = igk_heun_correct(x[j], k1[j], f[j], p);
            break;
        }
        default: /* IGK_KIND_SDE_LAST, IGK_KIND_EULER */
            for (int j = 0; j < 4; ++j) xn[j] = igk_euler(x[j], f[j], p);
            break;
    }

    if (b.x_out) igk_store4<VEC>(b.x_out, ic, m, xn);
    if (b.net_out) {
        igk_store4<VEC>(b.net_out, ic, m, xn);
        if (p.dup_next) igk_store4<VEC>(b.net_out, (b.n + n) * E + e0, m, xn);
    }
    if (b.first_bad && p.kind != IGK_KIND_HEUN_PREDICT) {
        bool bad = false;
        for (int j = 0; j < m; ++j) bad = bad || !igk_finite(xn[j]);
        if (bad) igk_flag_first_bad(b.first_bad + n, p.step_index);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Indexed launches (igk_step_table): the scalars come from a table on the device, so the checks
 * the host makes for a by-value launch (igk_common.h) are made here, once per thread block, and
 * the buffers a kind does not use are dropped before igk_step_block sees them.
 * ------------------------------------------------------------------------------------------- */

/* enum igk_fault for params p on buffers b whose v_final / v_inter hold v_rows rows and net_out net_rows. */
IGK_HD inline int igk_launch_fault(const igk_step_params& p, const igk_step_buffers& b, int64_t v_rows,
                                   int64_t net_rows) {
    if (p.kind < IGK_KIND_SDE || p.kind > IGK_KIND_HEUN_CORRECT) return IGK_FAULT_KIND;
    if (p.family < IGK_FAMILY_SIT || p.family > IGK_FAMILY_RAEV2) return IGK_FAULT_KIND;
    const bool sde = p.kind == IGK_KIND_SDE || p.kind == IGK_KIND_SDE_LAST;
    if (sde != (p.drift != 0) || (p.drift && p.family != IGK_FAMILY_SIT)) return IGK_FAULT_KIND;
    if (p.family == IGK_FAMILY_RAEV2 && p.kind != IGK_KIND_EULER) return IGK_FAULT_KIND;
    if (v_rows != (p.cfg ? 2 * b.n : b.n)) return IGK_FAULT_ROWS;
    if (p.dup_next && b.net_out && net_rows < 2 * b.n) return IGK_FAULT_ROWS;
    if ((p.ig && !b.v_inter) || (p.kind == IGK_KIND_SDE && !b.indices) || (p.dup_next && !b.net_out))
        return IGK_FAULT_NULL;
    if (p.kind == IGK_KIND_HEUN_PREDICT) return b.k1_out ? IGK_FAULT_NONE : IGK_FAULT_NULL;
    if (!b.x_out || (p.kind == IGK_KIND_HEUN_CORRECT && !b.k1_in)) return IGK_FAULT_NULL;
    return IGK_FAULT_NONE;
}

/* The buffers launch kind p.kind uses, from buffers that carry every pointer of a plan (igk_api.h).
 * The predictor keeps x as the state: it writes k1 and the corrector's input, never x_out. */
IGK_HD inline igk_step_buffers igk_select_buffers(const igk_step_params& p, igk_step_buffers b) {
    if (!p.ig) b.v_inter = nullptr;
    if (p.kind != IGK_KIND_SDE) b.indices = nullptr;
    if (p.kind != IGK_KIND_HEUN_CORRECT) b.k1_in = nullptr;
    if (p.kind != IGK_KIND_HEUN_PREDICT) b.k1_out = nullptr;
    if (p.kind == IGK_KIND_HEUN_PREDICT) {
        b.x_out = nullptr;
        b.first_bad = nullptr;
    }
    return b;
}

/* One block of the contract's Gaussians (noise.gaussian): row n, elements 4 blk.. of `numel`. */
IGK_HD inline void igk_gaussian_block(uint64_t seed, uint32_t stream, const int64_t* indices, int64_t numel,
                                      float* out, int64_t n, int64_t blk) {
    uint32_t w[4];
    float g[4];
    igk_noise_words((uint32_t)seed, (uint32_t)(seed >> 32), (uint64_t)blk, stream, (uint64_t)indices[n], w);
    igk_box_muller(w, g);
    const int64_t e0 = blk * 4;
    const int m = (numel - e0) < 4 ? (int)(numel - e0) : 4;
    for (int j = 0; j < m; ++j) out[n * numel + e0 + j] = g[j];
}

#endif /* IGK_MATH_H */
