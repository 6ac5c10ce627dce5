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
    if (p->family < IGK_FAMILY_SIT || p->family > IGK_FAMILY_RAEV2)
        return fail(IGK_ERR_KIND, "unknown family %d", p->family);
    const bool sde = p->kind == IGK_KIND_SDE || p->kind == IGK_KIND_SDE_LAST;
    if (sde != (p->drift != 0)) return fail(IGK_ERR_KIND, "drift must be set exactly for the SDE kinds");
    if (p->drift && p->family != IGK_FAMILY_SIT) return fail(IGK_ERR_KIND, "the SDE drift is a SiT-family field");
    if (p->family == IGK_FAMILY_RAEV2 && p->kind != IGK_KIND_EULER)
        return fail(IGK_ERR_KIND, "a RAEv2 launch is an Euler step (kind %d given)", p->kind);
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

/* What the host can check of an indexed launch (the scalars themselves are checked where they are
 * read, by igk_launch_fault). */
inline int validate_indexed(const igk_step_table* t, const igk_step_buffers* b) {
    if (!t || !b) return fail(IGK_ERR_NULL, "table and buffers must not be NULL");
    if (!t->params || !t->counter) return fail(IGK_ERR_NULL, "the table's params and counter must not be NULL");
    if (t->count <= 0) return fail(IGK_ERR_SIZE, "the table has %lld launches, expected > 0", (long long)t->count);
    if (b->n <= 0 || b->e <= 0) return fail(IGK_ERR_SIZE, "n = %lld and e = %lld must be > 0", (long long)b->n, (long long)b->e);
    if (b->n > (int64_t(1) << 31) || b->e > (int64_t(1) << 40))
        return fail(IGK_ERR_SIZE, "n = %lld or e = %lld too large", (long long)b->n, (long long)b->e);
    if (b->v_dtype < IGK_DTYPE_F32 || b->v_dtype > IGK_DTYPE_F16) return fail(IGK_ERR_DTYPE, "unknown v_dtype %d", b->v_dtype);
    if (!b->x) return fail(IGK_ERR_NULL, "x is NULL");
    if (!b->v_final) return fail(IGK_ERR_NULL, "v_final is NULL");
    if (t->v_rows != b->n && t->v_rows != 2 * b->n)
        return fail(IGK_ERR_SIZE, "v_rows = %lld, expected n = %lld or 2n", (long long)t->v_rows, (long long)b->n);
    if (b->net_out ? (t->net_rows != b->n && t->net_rows != 2 * b->n) : t->net_rows != 0)
        return fail(IGK_ERR_SIZE, "net_rows = %lld, expected n or 2n (0 without net_out)", (long long)t->net_rows);
    return IGK_OK;
}

/* Text and status of an enum igk_fault (the CPU twin reports what the CUDA kernel records). */
inline int fault_status(int fault) {
    return fault == IGK_FAULT_NULL ? IGK_ERR_NULL : fault == IGK_FAULT_KIND ? IGK_ERR_KIND : IGK_ERR_SIZE;
}

inline const char* fault_text(int fault) {
    switch (fault) {
        case IGK_FAULT_COUNTER: return "the counter is outside the table";
        case IGK_FAULT_KIND: return "unknown kind or family, or flags that contradict the kind";
        case IGK_FAULT_ROWS: return "the buffers' row counts do not fit the launch (v_rows vs cfg, net_rows vs dup_next)";
        case IGK_FAULT_NULL: return "a buffer the launch's kind needs is NULL";
        default: return "no fault";
    }
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
