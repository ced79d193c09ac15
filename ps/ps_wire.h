/* ps_wire.h - protobuf messages with tensor payloads that are not copied.
 * SPDX-License-Identifier: MIT
 *
 * protobuf-c copies every `bytes` field on pack and unpack. For tensors that
 * is one or two extra copies of every gradient and parameter, so messages
 * that carry tensors (PushRequest.grads, PullReply.params) are written and
 * read here instead, as valid protobuf on the wire:
 *
 *  - Writing: the small fields are packed by protobuf-c; each tensor is the
 *    field's tag and length, its small fields packed by protobuf-c, then the
 *    data field's tag and length and the data itself as a zero-copy segment
 *    (rpc_seg with a release callback) pointing into the sender's memory.
 *  - Reading: the top-level fields are split; everything but the tensor
 *    field is unpacked by protobuf-c, each tensor's small fields are
 *    unpacked by protobuf-c, and its data is returned as a pointer into the
 *    received buffer, or as pieces of it when the message came in pieces
 *    (gRPC's slices, read in place). Data pointers may be unaligned: read
 *    them with memcpy (ps_wire_load_add and friends do).
 * Any malformed input is refused with CM_EINVAL and a message.
 */
#ifndef PS_WIRE_H
#define PS_WIRE_H
#include <stddef.h>
#include <stdint.h>

#include "common/cm_model.h"
#include "common/cm_placement.h"
#include "proto/ps.pb-c.h"
#include "proto/rpc.h"

/* ------------------------------------------------------------ writing */

typedef struct ps_wire_writer {
    rpc_seg *segs; /* Output segments; small ones point into 'small'. */
    int nsegs, cap;
    uint8_t *small; /* Packed small fields and tensor framing. */
    size_t small_len, small_cap;
    size_t *small_off; /* Per segment: offset into small, or SIZE_MAX. */
} ps_wire_writer;

void ps_wire_writer_init(ps_wire_writer *w);

/* Append a whole message packed by protobuf-c (its tensor fields must be
 * empty; tensors are appended with ps_wire_put_tensor). */
void ps_wire_put_message(ps_wire_writer *w, const ProtobufCMessage *m);

/* Append one Tensor as top-level field 'field': 'meta' (data left empty)
 * plus 'len' bytes at 'data', sent in place. 'release(ud)' (may be NULL for
 * memory that outlives the call) runs when gRPC is done with the bytes. */
void ps_wire_put_tensor(ps_wire_writer *w, uint32_t field, const Psrpc__Tensor *meta,
                        const void *data, size_t len, void (*release)(void *), void *ud);

/* Fill *t (data left empty) as the float32 Tensor of partition 'part':
 * its id and shape (rows of the partition, then the variable's other
 * dimensions), written into 'shape', which t->shape then points to. */
void ps_wire_part_meta(const cm_model *m, const cm_placement *pl, uint32_t part,
                       uint64_t shape[CM_VAR_MAX_DIMS], Psrpc__Tensor *t);

/* The same as a bfloat16 Tensor (pushed gradients only): 'data' holds
 * the partition's count values (2 bytes each, from ps_wire_bf16_from_f32),
 * sent in place. */
void ps_wire_put_part_bf16(ps_wire_writer *w, uint32_t field, const cm_model *m,
                           const cm_placement *pl, uint32_t part, const uint16_t *data,
                           void (*release)(void *), void *ud);

/* Append partition 'part' of the placement as a float32 Tensor of its
 * shape (rows of the partition, then the variable's other dimensions), with
 * 'data' (the partition's count floats) sent in place as in
 * ps_wire_put_tensor. */
void ps_wire_put_part(ps_wire_writer *w, uint32_t field, const cm_model *m,
                      const cm_placement *pl, uint32_t part, const float *data,
                      void (*release)(void *), void *ud);

/* Append one Rows message as top-level field 'field': table 't', the n ids
 * (packed into the message), and 'len' bytes of values at 'data' sent in
 * place (dtype: PSRPC__DTYPE__DTYPE_FLOAT32 or _BFLOAT16; len 0 for a
 * request of ids only), released as in ps_wire_put_tensor. */
void ps_wire_put_rows(ps_wire_writer *w, uint32_t field, uint32_t table, const uint64_t *ids,
                      size_t n, Psrpc__DType dtype, const void *data, size_t len,
                      void (*release)(void *), void *ud);

/* The segments to hand to rpc_call_start/rpc_reply; valid until the writer
 * is reset or freed. */
const rpc_seg *ps_wire_segs(ps_wire_writer *w, int *nsegs);

/* Total bytes written so far. */
size_t ps_wire_size(const ps_wire_writer *w);

/* Free the writer's buffers (not the zero-copy data). Call after the
 * segments were handed over (rpc copies the small ones). If they never
 * were, pass run_releases = 1 so zero-copy segments are released. */
void ps_wire_writer_free(ps_wire_writer *w, int run_releases);

/* ------------------------------------------------------------ reading */

typedef struct ps_wire_tensor {
    Psrpc__Tensor *meta; /* Small fields (data empty). */
    const uint8_t *data; /* Into the received buffer; may be unaligned. NULL
                          * when the data lies in more than one piece
                          * (ps_wire_decode_pieces) or len is 0. */
    size_t len;
    const rpc_piece *pieces; /* The data in place, in order: npieces of them
                              * (1 when data is set, 0 when len is 0). */
    int npieces;
} ps_wire_tensor;

typedef struct ps_wire_rows {
    Psrpc__Rows *meta;   /* Table, ids (copied), dtype; data empty. */
    const uint8_t *data; /* Into the received buffer, or into 'own' when it
                          * came in several pieces; may be unaligned; never
                          * NULL (len 0: an empty range). */
    size_t len;
    uint8_t *own; /* The gathered copy, or NULL (freed with the message). */
} ps_wire_rows;

typedef struct ps_wire_msg {
    ProtobufCMessage *msg; /* Everything but the tensors and rows. */
    int ntensors;
    ps_wire_tensor *tensors;
    int nrows;
    ps_wire_rows *rows;
    rpc_piece *pieces; /* Storage of the tensors' pieces. */
} ps_wire_msg;

/* Decode 'buf' as a message of type 'desc' whose repeated Tensor field is
 * number 'tensor_field' and whose repeated Rows field with values is
 * number 'rows_field' (0: none). Returns CM_OK or CM_EINVAL (message in
 * err). The result borrows 'buf' for the data pointers; free with
 * ps_wire_msg_free. */
int ps_wire_decode_rows(const ProtobufCMessageDescriptor *desc, uint32_t tensor_field,
                        uint32_t rows_field, const uint8_t *buf, size_t len, ps_wire_msg *out,
                        char *err, size_t errlen);
int ps_wire_decode(const ProtobufCMessageDescriptor *desc, uint32_t tensor_field,
                   const uint8_t *buf, size_t len, ps_wire_msg *out, char *err, size_t errlen);

/* The same for a message received as pieces (rpc_handler_pieces,
 * rpc_done_pieces) without gathering it: only the small fields are
 * copied; tensors keep their data as pieces (ps_wire_tensor.pieces), and
 * rows whose values span pieces are gathered into ps_wire_rows.own.
 * Fields and elements are counted as by ps_wire_check_elems before
 * protobuf-c unpacks them: beyond max_elems (0: no limit) the message is
 * refused with CM_ENOMEM. Borrows the pieces' bytes like ps_wire_decode. */
int ps_wire_decode_pieces(const ProtobufCMessageDescriptor *desc, uint32_t tensor_field,
                          uint32_t rows_field, const rpc_piece *pieces, int npieces,
                          uint64_t max_elems, ps_wire_msg *out, char *err, size_t errlen);
void ps_wire_msg_free(ps_wire_msg *m);

/* Copy a decoded tensor's len bytes of data (from its pieces) to dst. */
void ps_wire_tensor_copy(void *dst, const ps_wire_tensor *t);

/* Before decoding untrusted bytes as a message of type desc: walk its
 * fields (into embedded messages) without allocating, and count every
 * field occurrence and every element of packed repeated fields, each of
 * which may cost the decoder an allocation. CM_OK within max; CM_ENOMEM
 * beyond (message in err), so that a small message cannot unpack into
 * gigabytes; CM_EINVAL if the bytes are not a message. */
#define PS_WIRE_MAX_ELEMS 262144
int ps_wire_check_elems(const ProtobufCMessageDescriptor *desc, const uint8_t *buf, size_t len,
                        uint64_t max, char *err, size_t errlen);

/* The ids of a Rows message: CM_OK with *n of them copied into *ids (an
 * aligned array to free(); NULL when there are none), or CM_EINVAL when the
 * bytes are not a whole number of uint64 (message in err). */
int ps_wire_ids(const Psrpc__Rows *r, uint64_t **ids, size_t *n, char *err, size_t errlen);

/* ------------------------------------------------------------ the model */

/* A ModelSpec of m (every variable) and the placement's minimum partition,
 * for an InitRequest. The spec and what it points to live in *sp until
 * ps_wire_spec_free(sp). */
typedef struct ps_wire_spec {
    Psrpc__ModelSpec spec;
    Psrpc__Variable *vars;
    Psrpc__Variable **ptrs;
    uint64_t *shapes; /* CM_VAR_MAX_DIMS per variable. */
    uint32_t sizes[CM_MLP_MAX_SIZES];
    char desc[256];
} ps_wire_spec;
void ps_wire_spec_init(ps_wire_spec *sp, const cm_model *m, size_t min_part_bytes);
void ps_wire_spec_free(ps_wire_spec *sp);

/* The model a ModelSpec describes, and its minimum partition. CM_EINVAL
 * (naming the fault in err) for a spec that is not a valid model. */
int ps_wire_spec_model(const Psrpc__ModelSpec *spec, cm_model **out, size_t *min_part_bytes,
                       char *err, size_t errlen);

/* The identity every request carries: a fingerprint of the model, the
 * number of PS and the placement (placement->fingerprint covers all three)
 * and the same in words, e.g. "mlp 784,256,128,10 on 2 PS (min partition
 * 262144 B)" or "deepfm 39 tables of 11, 400,400,400 on 2 PS (...)",
 * written to desc. */
uint64_t ps_wire_identity(const cm_model *m, const cm_placement *pl, char *desc, size_t len);

/* The model alone in words: "mlp 784,256,128,10", "deepfm 39 tables of 11,
 * 476001 dense 400,400,400". */
void ps_wire_describe(const cm_model *m, char *desc, size_t len);

/* dst[i] += value i of src (n floats, src possibly unaligned). */
void ps_wire_load_add(float *dst, const uint8_t *src, size_t n);

/* ------------------------------------------------------------ bfloat16
 * Pushed gradients may travel as bfloat16 (DTYPE_BFLOAT16): the upper 16
 * bits of the float32, so widening is exact and only the narrowing rounds.
 * Narrowing rounds to nearest, ties to even (as torch and the CUDA
 * __float2bfloat16 do): finite values that round past the largest bf16
 * become +-inf, infinities stay infinities, and a NaN stays a NaN (its sign
 * and upper payload bits kept, the quiet bit set) instead of rounding into
 * an infinity. The loops have no branches in their bodies (the compiler
 * vectorises them). */

/* dst[i] = src[i] as bfloat16 bits (n values; the buffers must not overlap). */
void ps_wire_bf16_from_f32(uint16_t *restrict dst, const float *restrict src, size_t n);

/* dst[i] = value i of src (n bfloat16, src possibly unaligned) as float32. */
void ps_wire_load_bf16(float *restrict dst, const uint8_t *restrict src, size_t n);

/* dst[i] += value i of src (n bfloat16, src possibly unaligned). */
void ps_wire_load_add_bf16(float *restrict dst, const uint8_t *restrict src, size_t n);

#endif /* PS_WIRE_H */
