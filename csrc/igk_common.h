/*
 * igk_common.h -- host-side helpers shared by the CPU twin and the CUDA launcher: argument
 * validation (the C side's last line of defence; the Python binding checks first and explains
 * more), the per-thread error text, and the alignment test that selects the vectorised path.
 */
#ifndef IGK_COMMON_H
#define IGK_COMMON_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

#include "igk_api.h"

namespace igk {

inline char* error_buffer() {
    static thread_local char buf[512] = "";
    return buf;
}

inline int fail(int status, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(error_buffer(), 512, fmt, ap);
    va_end(ap);
    return status;
}

inline int ok() {
    error_buffer()[0] = '\0';
    return IGK_OK;
}

/* The contract of igk_step_buffers for the given kind (see igk_api.h). */
inline int validate(const igk_step_params* p, const igk_step_buffers* b) {
    if (!p || !b) return fail(IGK_ERR_NULL, "params and buffers must not be NULL");
    if (b->n <= 0 || b->e <= 0) return fail(IGK_ERR_SIZE, "n = %lld and e = %lld must be > 0", (long long)b->n, (long long)b->e);
    if (b->n > (int64_t(1) << 31) || b->e > (int64_t(1) << 40))
        return fail(IGK_ERR_SIZE, "n = %lld or e = %lld too large", (long long)b->n, (long long)b->e);
    if (b->v_dtype < IGK_DTYPE_F32 || b->v_dtype > IGK_DTYPE_F16) return fail(IGK_ERR_DTYPE, "unknown v_dtype %d", b->v_dtype);
    if (p->kind < IGK_KIND_SDE || p->kind > IGK_KIND_HEUN_CORRECT) return fail(IGK_ERR_KIND, "unknown kind %d", p->kind);
    if (p->family != IGK_FAMILY_SIT && p->family != IGK_FAMILY_LIGHTNINGDIT)
        return fail(IGK_ERR_KIND, "unknown family %d", p->family);
    const bool sde = p->kind == IGK_KIND_SDE || p->kind == IGK_KIND_SDE_LAST;
    if (sde != (p->drift != 0)) return fail(IGK_ERR_KIND, "drift must be set exactly for the SDE kinds");
    if (p->drift && p->family != IGK_FAMILY_SIT) return fail(IGK_ERR_KIND, "the SDE drift is a SiT-family field");
    if (!b->x) return fail(IGK_ERR_NULL, "x is NULL");
    if (!b->v_final) return fail(IGK_ERR_NULL, "v_final is NULL");
    if (p->ig && !b->v_inter) return fail(IGK_ERR_NULL, "IG is active but v_inter is NULL");
    if (p->kind == IGK_KIND_SDE && !b->indices) return fail(IGK_ERR_NULL, "the SDE step needs the sample indices");
    if (p->kind == IGK_KIND_HEUN_CORRECT && !b->k1_in) return fail(IGK_ERR_NULL, "the Heun corrector needs k1_in");
    if (p->kind == IGK_KIND_HEUN_PREDICT && !b->k1_out) return fail(IGK_ERR_NULL, "the Heun predictor needs k1_out");
    if (p->kind != IGK_KIND_HEUN_PREDICT && !b->x_out) return fail(IGK_ERR_NULL, "x_out is NULL");
    if (p->dup_next && !b->net_out) return fail(IGK_ERR_NULL, "dup_next is set but net_out is NULL");
    return IGK_OK;
}

inline bool aligned(const void* ptr, uintptr_t a) { return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) % a) == 0; }

/* The vectorised path: whole blocks only, 16-byte float4 for fp32 buffers, 8 bytes for 16-bit v. */
inline bool can_vectorise(const igk_step_buffers* b) {
    const uintptr_t va = b->v_dtype == IGK_DTYPE_F32 ? 16 : 8;
    return b->e % 4 == 0 && aligned(b->x, 16) && aligned(b->k1_in, 16) && aligned(b->x_out, 16) &&
           aligned(b->k1_out, 16) && aligned(b->net_out, 16) && aligned(b->v_final, va) && aligned(b->v_inter, va);
}

inline int64_t num_blocks(int64_t e) { return (e + 3) / 4; }

}  // namespace igk

#endif /* IGK_COMMON_H */
