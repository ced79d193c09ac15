"""pstrain: the parameter-server client for Python training loops.

A thin ctypes binding of the C client library (libpstrain.so, pstrain/pstrain.h):
numpy arrays go in and out without extra copies (gradients are sent from the
array's memory, parameters are written into the array you pass).

    import numpy as np, pstrain
    c = pstrain.Client("ps0:5000,ps1:5000", [("w", 784 * 10), ("b", 10)],
                       rank=0, num_workers=2, optimizer="adam", lr=0.001,
                       auth_token_file="worker.token", admin_token_file="admin.token")
    params = np.empty(c.numel, np.float32)
    if c.rank == 0:
        c.init()                      # the chief: initial values from the seed
    c.pull(0, out=params)
    for t in range(steps):
        grad = my_gradient(params)    # any framework
        c.step(t, grad, out=params)   # push step t, get version t + 1
    if c.rank == 0:
        c.shutdown()
    c.close()

A model with embedding tables (rows by 64-bit id, created on first use) passes
tables=[("user", 16), ...] and trains with step_rows / pull_rows (see their doc).

The library is found through $PSTRAIN_LIB (a path), else as libpstrain.so.0 on the
loader's path (LD_LIBRARY_PATH, or an install into the system's library directory).
"""
import ctypes
import os

import numpy as np

__all__ = ["Client", "Error"]
__version__ = "0.1.0"


class Error(RuntimeError):
    """A failed call: .code is the library's negative status, str() its message."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class _Var(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("numel", ctypes.c_size_t)]


class _Table(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("dim", ctypes.c_int)]


class _Rows(ctypes.Structure):
    _fields_ = [("begin", ctypes.POINTER(ctypes.c_size_t)),
                ("ids", ctypes.POINTER(ctypes.c_uint64))]


class _Options(ctypes.Structure):
    _fields_ = [("ps_hosts", ctypes.c_char_p), ("rank", ctypes.c_int),
                ("num_workers", ctypes.c_int), ("vars", ctypes.POINTER(_Var)),
                ("nvars", ctypes.c_int), ("optimizer", ctypes.c_char_p), ("lr", ctypes.c_float),
                ("async_", ctypes.c_int), ("seed", ctypes.c_uint64),
                ("init_scale", ctypes.c_float), ("auth_token_file", ctypes.c_char_p),
                ("admin_token_file", ctypes.c_char_p), ("tls_ca", ctypes.c_char_p),
                ("deadline_ms", ctypes.c_int64), ("connect_timeout_ms", ctypes.c_int64),
                ("tables", ctypes.POINTER(_Table)), ("ntables", ctypes.c_int),
                ("table_optimizer", ctypes.c_char_p), ("table_lr", ctypes.c_float)]


_lib = None


def _load():
    global _lib
    if _lib is not None:
        return _lib
    lib = ctypes.CDLL(os.environ.get("PSTRAIN_LIB") or "libpstrain.so.0")
    F = ctypes.POINTER(ctypes.c_float)
    E = [ctypes.c_char_p, ctypes.c_size_t]
    P = ctypes.c_void_p
    lib.pst_options_default.argtypes = [ctypes.POINTER(_Options)]
    lib.pst_options_default.restype = None
    lib.pst_client_create.argtypes = [ctypes.POINTER(_Options), ctypes.POINTER(P), *E]
    lib.pst_client_destroy.argtypes = [P]
    lib.pst_client_destroy.restype = None
    lib.pst_numel.argtypes = [P]
    lib.pst_numel.restype = ctypes.c_size_t
    lib.pst_init.argtypes = [P, F, *E]
    lib.pst_step.argtypes = [P, ctypes.c_int64, F, F, *E]
    lib.pst_pull.argtypes = [P, ctypes.c_int64, F, ctypes.POINTER(ctypes.c_int64), *E]
    lib.pst_shutdown.argtypes = [P, ctypes.c_int, *E]
    lib.pst_row_width.argtypes = [P]
    lib.pst_row_width.restype = ctypes.c_size_t
    R = ctypes.POINTER(_Rows)
    lib.pst_step_rows.argtypes = [P, ctypes.c_int64, F, F, R, F, R, F, *E]
    lib.pst_pull_rows.argtypes = [P, ctypes.c_int64, R, F, ctypes.c_int, *E]
    for f in (lib.pst_client_create, lib.pst_init, lib.pst_step, lib.pst_pull,
              lib.pst_shutdown, lib.pst_step_rows, lib.pst_pull_rows):
        f.restype = ctypes.c_int
    _lib = lib
    return lib


def _b(s):
    return None if s is None else os.fsencode(s)


def _floats(a):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


class Client:
    """One worker's connection to the PS shards (see the module's doc)."""

    def __init__(self, ps_hosts, variables, rank=0, num_workers=1, optimizer="sgd", lr=0.1,
                 asynchronous=False, seed=1, init_scale=0.05, auth_token_file=None,
                 admin_token_file=None, tls_ca=None, deadline_ms=60000,
                 connect_timeout_ms=30000, tables=(), table_optimizer="adagrad",
                 table_lr=None):
        lib = _load()
        o = _Options()
        lib.pst_options_default(ctypes.byref(o))
        names = [_b(n) for n, _ in variables]  # kept alive during the call
        vars_ = (_Var * len(variables))(*[_Var(nm, int(k)) for nm, (_, k) in
                                          zip(names, variables)])
        self._keep = (names, vars_, _b(ps_hosts), _b(optimizer), _b(auth_token_file),
                      _b(admin_token_file), _b(tls_ca))
        o.ps_hosts, o.rank, o.num_workers = self._keep[2], rank, num_workers
        o.vars, o.nvars = vars_, len(variables)
        o.optimizer, o.lr, o.async_, o.seed = self._keep[3], lr, int(bool(asynchronous)), seed
        o.init_scale = init_scale
        o.auth_token_file, o.admin_token_file, o.tls_ca = self._keep[4:7]
        o.deadline_ms, o.connect_timeout_ms = deadline_ms, connect_timeout_ms
        tnames = [_b(n) for n, _ in tables]
        tabs = (_Table * max(len(tables), 1))(*[_Table(nm, int(d)) for nm, (_, d) in
                                                 zip(tnames, tables)])
        self._keep += (tnames, tabs, _b(table_optimizer))
        if tables:
            o.tables, o.ntables = tabs, len(tables)
        o.table_optimizer = self._keep[-1]
        o.table_lr = 0.0 if table_lr is None else table_lr
        self.ntables = len(tables)
        self._err = ctypes.create_string_buffer(1024)
        h = ctypes.c_void_p()
        self._check(lib.pst_client_create(ctypes.byref(o), ctypes.byref(h), self._err,
                                          len(self._err)))
        self._h, self._lib, self.rank = h, lib, rank
        self.numel = int(lib.pst_numel(h))
        self.row_width = int(lib.pst_row_width(h))

    def _check(self, rc):
        if rc != 0:
            raise Error(rc, self._err.value.decode(errors="replace"))

    def _vector(self, a, name, writable):
        if a is None:
            return np.empty(self.numel, np.float32)
        if (not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.size != self.numel or
                not a.flags.c_contiguous or (writable and not a.flags.writeable)):
            if writable:
                raise ValueError(f"{name} must be a writable C-contiguous float32 array of "
                                 f"{self.numel} elements")
            a = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)  # a copy only if needed
            if a.size != self.numel:
                raise ValueError(f"{name} has {a.size} elements, the model {self.numel}")
        return a

    def init(self, values=None):
        """The chief: initialise every shard (from the seed, or with values)."""
        v = None if values is None else self._vector(values, "values", False)
        self._check(self._lib.pst_init(self._h, None if v is None else _floats(v), self._err,
                                       len(self._err)))

    def step(self, step, grad, out=None):
        """Push grad as this worker's gradient of step; return the parameters that
        result (version step + 1 in sync mode), written into out when given."""
        g = self._vector(grad, "grad", False)
        p = self._vector(out, "out", True)
        self._check(self._lib.pst_step(self._h, step, _floats(g), _floats(p), self._err,
                                       len(self._err)))
        return p

    def pull(self, min_version=0, out=None):
        """The parameters at version >= min_version: (array, version)."""
        p = self._vector(out, "out", True)
        v = ctypes.c_int64()
        self._check(self._lib.pst_pull(self._h, min_version, _floats(p), ctypes.byref(v),
                                       self._err, len(self._err)))
        return p, v.value

    def _rows(self, rows, name):
        """A list of one id array per table as (_Rows, n, kept arrays)."""
        if self.ntables == 0:
            raise ValueError("the model has no tables")
        if len(rows) != self.ntables:
            raise ValueError(f"{name} needs one id array per table ({self.ntables})")
        parts = [np.ascontiguousarray(r, dtype=np.uint64).reshape(-1) for r in rows]
        begin = np.zeros(self.ntables + 1, dtype=np.uintp)
        begin[1:] = np.cumsum([p.size for p in parts])
        ids = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
        r = _Rows(begin.ctypes.data_as(ctypes.POINTER(ctypes.c_size_t)),
                  ids.ctypes.data_as(ctypes.POINTER(ctypes.c_uint64)))
        return r, int(begin[-1]), (begin, ids)

    def _row_array(self, a, n, name, writable):
        shape = (n, self.row_width)
        if a is None:
            return np.zeros(shape, np.float32)
        if (not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != shape or
                not a.flags.c_contiguous or (writable and not a.flags.writeable)):
            if writable:
                raise ValueError(f"{name} must be a writable C-contiguous float32 array of "
                                 f"shape {shape}")
            a = np.ascontiguousarray(a, dtype=np.float32)
            if a.shape != shape:
                raise ValueError(f"{name} has shape {a.shape}, not {shape}")
        return a

    def step_rows(self, step, grad, rows=None, row_grad=None, next_rows=None, out=None,
                  next_out=None):
        """A step of a model with tables: push grad (dense) and row_grad, the gradients
        of the rows 'rows' (one id array per table; row i of row_grad is the i-th id over
        all tables, row_width floats), get the dense parameters that result (into out) and,
        with next_rows, those rows' values at that version: (params, next_values)."""
        g = self._vector(grad, "grad", False)
        p = self._vector(out, "out", True)
        rr = rg = nr = nv = None
        keep = []
        if rows is not None:
            rr, n, k = self._rows(rows, "rows")
            rg = self._row_array(row_grad, n, "row_grad", False)
            keep += [k, rg]
        if next_rows is not None:
            nr, m, k = self._rows(next_rows, "next_rows")
            nv = self._row_array(next_out, m, "next_out", True)
            keep.append(k)
        self._check(self._lib.pst_step_rows(
            self._h, step, _floats(g), _floats(p), None if rr is None else ctypes.byref(rr),
            None if rg is None else _floats(rg), None if nr is None else ctypes.byref(nr),
            None if nv is None else _floats(nv), self._err, len(self._err)))
        return p, nv

    def pull_rows(self, rows, min_version=0, train=True, out=None):
        """The values of 'rows' (one id array per table) at version >= min_version, an
        array of (ids, row_width) floats; train creates missing rows."""
        r, n, keep = self._rows(rows, "rows")
        v = self._row_array(out, n, "out", True)
        if n:
            self._check(self._lib.pst_pull_rows(self._h, min_version, ctypes.byref(r),
                                                _floats(v), int(bool(train)), self._err,
                                                len(self._err)))
        return v

    def shutdown(self, failed=False):
        """The chief, at the end: the shards checkpoint and exit."""
        self._check(self._lib.pst_shutdown(self._h, int(bool(failed)), self._err,
                                           len(self._err)))

    def close(self):
        if getattr(self, "_h", None):
            self._lib.pst_client_destroy(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()
