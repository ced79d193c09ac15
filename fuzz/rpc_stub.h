/* rpc_stub.h - proto/rpc.h without gRPC, for the fuzz targets: the server
 * side runs in-process, calls are made by the harness and finish in it.
 * SPDX-License-Identifier: MIT
 *
 * rpc_stub.c implements every function of proto/rpc.h (so proto/rpc.c is
 * never linked): a server records its methods; rpc_stub_invoke() runs the
 * handler of a method on the caller's thread with a private heap copy of
 * the request (freed when the handler returns, so a handler that keeps a
 * pointer into it is caught by ASan; a handler of pieces gets it cut into
 * pieces of 1 to 97 bytes, each its own heap block); rpc_reply/rpc_fail
 * record how the
 * call ended. The rules of rpc.h are checked, and a broken one aborts with
 * a message (libFuzzer reports it as a crash):
 *  - a call is finished exactly once (a second rpc_reply/rpc_fail aborts);
 *  - every call is finished before rpc_server_shutdown returns (the real
 *    server would wait forever for it);
 *  - zero-copy segments are released exactly once (here: at rpc_reply);
 *  - on_cancel finishes the held call it is given (rpc_stub_cancel).
 * Calls stay allocated until rpc_server_destroy, so the harness may read
 * their outcome after they finished. The client side of rpc.h fails every
 * call with RPC_UNAVAILABLE. Thread-safe like rpc.h (one lock).
 */
#ifndef FUZZ_RPC_STUB_H
#define FUZZ_RPC_STUB_H
#include <stddef.h>
#include <stdint.h>

#include "proto/rpc.h"

enum { RPC_STUB_OPEN = 0, RPC_STUB_REPLIED = 1, RPC_STUB_FAILED = 2 };

/* The server created last and not yet destroyed (the PS server and the
 * rendezvous keep theirs private), or NULL. */
rpc_server *rpc_stub_server(void);

/* Call 'method' with a copy of req[0..len) on this thread. The call may
 * still be open when this returns (a Pull waiting for a version). */
rpc_call *rpc_stub_invoke(rpc_server *s, const char *method, const uint8_t *req, size_t len);

/* The same as a caller of level RPC_AUTH_* (rpc_stub_invoke: admin, as a
 * server without tokens sees every call); a method registered for more is
 * refused PERMISSION_DENIED without running its handler, as in rpc.c. */
rpc_call *rpc_stub_invoke_as(rpc_server *s, const char *method, int level, const uint8_t *req,
                             size_t len);

/* The client of an open call goes away: the server's on_cancel runs,
 * which must finish the call (aborts otherwise). Returns 1 if it ran, 0
 * for a finished call or a server without on_cancel. */
int rpc_stub_cancel(rpc_call *c);

/* RPC_STUB_OPEN, _REPLIED or _FAILED; for a failed call its gRPC code. */
int rpc_stub_state(const rpc_call *c);
int rpc_stub_code(const rpc_call *c);
/* The reply's bytes (valid until the server is destroyed). */
const uint8_t *rpc_stub_reply(const rpc_call *c, size_t *len);

/* Calls of the server not finished yet. */
int rpc_stub_open_calls(rpc_server *s);

#endif /* FUZZ_RPC_STUB_H */
