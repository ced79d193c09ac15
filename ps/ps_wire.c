/* ps_wire.c - protobuf framing of tensor messages without copying the data.
 * SPDX-License-Identifier: MIT
 */
#include "ps/ps_wire.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_mem.h"
#include "common/cm_status.h"

enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_I32 = 5 };
#define DATA_FIELD 15 /* Tensor.data */

static size_t put_varint(uint8_t *p, uint64_t v) {
    size_t n = 0;
    while (v >= 0x80) {
        p[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (uint8_t)v;
    return n;
}

/* Parse a varint at *p (< end). Returns 0 on success. */
static int get_varint(const uint8_t **p, const uint8_t *end, uint64_t *v) {
    uint64_t r = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (*p >= end) return -1;
        uint8_t b = *(*p)++;
        r |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = r;
            return 0;
        }
    }
    return -1;
}

/* ------------------------------------------------------------ writing */

void ps_wire_writer_init(ps_wire_writer *w) { memset(w, 0, sizeof *w); }

static uint8_t *small_reserve(ps_wire_writer *w, size_t n) {
    if (w->small_len + n > w->small_cap) {
        size_t cap = w->small_cap ? w->small_cap : 256;
        while (cap < w->small_len + n) cap *= 2;
        uint8_t *s = realloc(w->small, cap);
        if (!s) abort();
        w->small = s;
        w->small_cap = cap;
    }
    return w->small + w->small_len;
}

static void add_seg(ps_wire_writer *w, size_t small_off, const void *data, size_t len,
                    void (*release)(void *), void *ud) {
    /* Merge consecutive small pieces into one segment. */
    if (small_off != SIZE_MAX && w->nsegs > 0 && w->small_off[w->nsegs - 1] != SIZE_MAX &&
        w->small_off[w->nsegs - 1] + w->segs[w->nsegs - 1].len == small_off) {
        w->segs[w->nsegs - 1].len += len;
        return;
    }
    if (w->nsegs == w->cap) {
        w->cap = w->cap ? 2 * w->cap : 8;
        w->segs = realloc(w->segs, (size_t)w->cap * sizeof *w->segs);
        w->small_off = realloc(w->small_off, (size_t)w->cap * sizeof *w->small_off);
        if (!w->segs || !w->small_off) abort();
    }
    w->segs[w->nsegs] = (rpc_seg){.data = data, .len = len, .release = release, .ud = ud};
    w->small_off[w->nsegs] = small_off;
    w->nsegs++;
}

void ps_wire_put_message(ps_wire_writer *w, const ProtobufCMessage *m) {
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *p = small_reserve(w, n);
    protobuf_c_message_pack(m, p);
    size_t off = w->small_len;
    w->small_len += n;
    add_seg(w, off, NULL, n, NULL, NULL);
}

void ps_wire_put_tensor(ps_wire_writer *w, uint32_t field, const Psrpc__Tensor *meta,
                        const void *data, size_t len, void (*release)(void *), void *ud) {
    size_t meta_len = protobuf_c_message_get_packed_size(&meta->base);
    uint8_t hdr[12];
    size_t hdr_len = put_varint(hdr, (DATA_FIELD << 3) | WT_LEN);
    hdr_len += put_varint(hdr + hdr_len, len);
    uint64_t inner = meta_len + hdr_len + len;
    uint8_t *p = small_reserve(w, 24 + meta_len + hdr_len);
    size_t n = put_varint(p, ((uint64_t)field << 3) | WT_LEN);
    n += put_varint(p + n, inner);
    protobuf_c_message_pack(&meta->base, p + n);
    n += meta_len;
    memcpy(p + n, hdr, hdr_len);
    n += hdr_len;
    size_t off = w->small_len;
    w->small_len += n;
    add_seg(w, off, NULL, n, NULL, NULL);
    if (len > 0)
        add_seg(w, SIZE_MAX, data, len, release, ud);
    else if (release)
        release(ud);
}

void ps_wire_part_meta(const cm_model *m, const cm_placement *pl, uint32_t part,
                       uint64_t shape[CM_VAR_MAX_DIMS], Psrpc__Tensor *t) {
    const cm_partition *p = &pl->parts[part];
    const cm_var *v = &m->vars[p->var];
    shape[0] = p->row_end - p->row_begin;
    for (int d = 1; d < v->ndims; d++) shape[d] = (uint64_t)v->dims[d];
    *t = (Psrpc__Tensor)PSRPC__TENSOR__INIT;
    t->part = part;
    t->dtype = PSRPC__DTYPE__DTYPE_FLOAT32;
    t->n_shape = (size_t)v->ndims;
    t->shape = shape;
}

/* Partition 'part' as a Tensor of 'dtype', 'vsize' bytes a value. */
static void put_part_as(ps_wire_writer *w, uint32_t field, const cm_model *m,
                        const cm_placement *pl, uint32_t part, Psrpc__DType dtype,
                        const void *data, size_t vsize, void (*release)(void *), void *ud) {
    uint64_t shape[CM_VAR_MAX_DIMS];
    Psrpc__Tensor t;
    ps_wire_part_meta(m, pl, part, shape, &t);
    t.dtype = dtype;
    ps_wire_put_tensor(w, field, &t, data, pl->parts[part].count * vsize, release, ud);
}

void ps_wire_put_part(ps_wire_writer *w, uint32_t field, const cm_model *m,
                      const cm_placement *pl, uint32_t part, const float *data,
                      void (*release)(void *), void *ud) {
    put_part_as(w, field, m, pl, part, PSRPC__DTYPE__DTYPE_FLOAT32, data, sizeof(float), release,
                ud);
}

void ps_wire_put_part_bf16(ps_wire_writer *w, uint32_t field, const cm_model *m,
                           const cm_placement *pl, uint32_t part, const uint16_t *data,
                           void (*release)(void *), void *ud) {
    put_part_as(w, field, m, pl, part, PSRPC__DTYPE__DTYPE_BFLOAT16, data, sizeof(uint16_t),
                release, ud);
}

const rpc_seg *ps_wire_segs(ps_wire_writer *w, int *nsegs) {
    for (int i = 0; i < w->nsegs; i++)
        if (w->small_off[i] != SIZE_MAX) w->segs[i].data = w->small + w->small_off[i];
    *nsegs = w->nsegs;
    return w->segs;
}

size_t ps_wire_size(const ps_wire_writer *w) {
    size_t n = 0;
    for (int i = 0; i < w->nsegs; i++) n += w->segs[i].len;
    return n;
}

void ps_wire_writer_free(ps_wire_writer *w, int run_releases) {
    if (run_releases)
        for (int i = 0; i < w->nsegs; i++)
            if (w->segs[i].release) w->segs[i].release(w->segs[i].ud);
    free(w->segs);
    free(w->small_off);
    free(w->small);
    memset(w, 0, sizeof *w);
}

/* ------------------------------------------------------------ reading */

typedef struct buf {
    uint8_t *p;
    size_t len, cap;
} buf;

static void buf_append(buf *b, const uint8_t *src, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n) cap *= 2;
        uint8_t *q = realloc(b->p, cap);
        if (!q) abort();
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->len, src, n);
    b->len += n;
}

/* Skip one field's payload of wire type 'wt' at *p. Sets *payload and *plen for
 * length-delimited fields. Returns 0 or -1 if malformed. */
static int skip_field(const uint8_t **p, const uint8_t *end, int wt, const uint8_t **payload,
                      uint64_t *plen) {
    uint64_t v;
    switch (wt) {
    case WT_VARINT: return get_varint(p, end, &v);
    case WT_I64:
        if (end - *p < 8) return -1;
        *p += 8;
        return 0;
    case WT_I32:
        if (end - *p < 4) return -1;
        *p += 4;
        return 0;
    case WT_LEN:
        if (get_varint(p, end, &v) || v > (uint64_t)(end - *p)) return -1;
        *payload = *p;
        *plen = v;
        *p += v;
        return 0;
    }
    return -1;
}

void ps_wire_msg_free(ps_wire_msg *m) {
    if (!m) return;
    if (m->msg) protobuf_c_message_free_unpacked(m->msg, NULL);
    for (int i = 0; i < m->ntensors; i++)
        if (m->tensors[i].meta) psrpc__tensor__free_unpacked(m->tensors[i].meta, NULL);
    free(m->tensors);
    memset(m, 0, sizeof *m);
}

int ps_wire_decode(const ProtobufCMessageDescriptor *desc, uint32_t tensor_field,
                   const uint8_t *in, size_t len, ps_wire_msg *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    buf rest = {0}, meta = {0};
    int cap = 0;
    const uint8_t *p = in, *end = in + len;
    const char *why = NULL;
    while (p < end) {
        const uint8_t *field_start = p;
        uint64_t key, plen = 0;
        const uint8_t *payload = NULL;
        if (get_varint(&p, end, &key)) {
            why = "bad field key";
            goto fail;
        }
        int wt = (int)(key & 7);
        uint64_t num = key >> 3;
        if (num == 0 || skip_field(&p, end, wt, &payload, &plen)) {
            why = "truncated or malformed field";
            goto fail;
        }
        if (num != tensor_field) {
            buf_append(&rest, field_start, (size_t)(p - field_start));
            continue;
        }
        if (wt != WT_LEN) {
            why = "tensor field with the wrong wire type";
            goto fail;
        }
        /* One Tensor: split its data field from the rest. */
        if (out->ntensors == cap) {
            cap = cap ? 2 * cap : 8;
            out->tensors = realloc(out->tensors, (size_t)cap * sizeof *out->tensors);
            if (!out->tensors) abort();
        }
        ps_wire_tensor *t = &out->tensors[out->ntensors++];
        memset(t, 0, sizeof *t);
        meta.len = 0;
        const uint8_t *q = payload, *tend = payload + plen;
        while (q < tend) {
            const uint8_t *fs = q;
            uint64_t k2, dlen = 0;
            const uint8_t *dp = NULL;
            if (get_varint(&q, tend, &k2) || (k2 >> 3) == 0 ||
                skip_field(&q, tend, (int)(k2 & 7), &dp, &dlen)) {
                why = "malformed tensor";
                goto fail;
            }
            if ((k2 >> 3) == DATA_FIELD && (k2 & 7) == WT_LEN) {
                t->data = dp;
                t->len = (size_t)dlen;
            } else {
                buf_append(&meta, fs, (size_t)(q - fs));
            }
        }
        t->meta = psrpc__tensor__unpack(NULL, meta.len, meta.p ? meta.p : (const uint8_t *)"");
        if (!t->meta) {
            why = "tensor fields do not parse";
            goto fail;
        }
    }
    out->msg = protobuf_c_message_unpack(desc, NULL, rest.len,
                                         rest.p ? rest.p : (const uint8_t *)"");
    if (!out->msg) {
        why = "message fields do not parse";
        goto fail;
    }
    free(rest.p);
    free(meta.p);
    return CM_OK;
fail:
    cm_seterr(err, errlen, "malformed %s: %s", desc->short_name, why);
    free(rest.p);
    free(meta.p);
    ps_wire_msg_free(out);
    return CM_EINVAL;
}

void ps_wire_load_add(float *dst, const uint8_t *src, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float v;
        memcpy(&v, src + 4 * i, sizeof v);
        dst[i] += v;
    }
}

void ps_wire_bf16_from_f32(uint16_t *restrict dst, const float *restrict src, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &src[i], sizeof u);
        /* Adding 0x7fff plus the lowest kept bit carries into the kept bits
         * exactly when the dropped half is above 0x8000, or equal to it and
         * the kept value is odd. No finite value or infinity overflows 32
         * bits; NaNs are taken apart instead (they could become inf). */
        uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        uint32_t quiet_nan = (u >> 16) | 0x40u;
        dst[i] = (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
    }
}

void ps_wire_load_bf16(float *restrict dst, const uint8_t *restrict src, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + 2 * i, sizeof h);
        uint32_t u = (uint32_t)h << 16;
        memcpy(&dst[i], &u, sizeof u);
    }
}

void ps_wire_load_add_bf16(float *restrict dst, const uint8_t *restrict src, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + 2 * i, sizeof h);
        uint32_t u = (uint32_t)h << 16;
        float v;
        memcpy(&v, &u, sizeof v);
        dst[i] += v;
    }
}

uint64_t ps_wire_identity(const cm_model *m, const cm_placement *pl, char *desc, size_t len) {
    int n = snprintf(desc, len, "%s ", m->kind);
    if (!strcmp(m->kind, "vector"))
        n += snprintf(desc + n, len - (size_t)n, "%zu", m->numel);
    else
        for (int i = 0; i < m->nsizes && n > 0 && (size_t)n < len; i++)
            n += snprintf(desc + n, len - (size_t)n, "%s%d", i ? "," : "", m->sizes[i]);
    if (n > 0 && (size_t)n < len)
        snprintf(desc + n, len - (size_t)n, " on %d PS (min partition %zu B)", pl->nshards,
                 pl->min_part_bytes);
    return pl->fingerprint;
}
