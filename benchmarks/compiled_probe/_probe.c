/* A throwaway measurement (issue #16): the common case of `async with pool.acquire() as conn:
 * await conn.fetchval(...)` in C, with the bookkeeping of the Python path (AcquireContext,
 * Slots.checkout_nowait, the clean return of AcquireContext.__aexit__ with driver.returned,
 * and optionally the proxy's statement), calling back into asyncpool's Python code for anything
 * else. Not a product: it reads the pool's __slots__ by their offsets (own C object types would
 * own those fields), and is checked against the Python path only by benchmarks/bench_overhead.py
 * --compiled-probe and test_probe.py.
 *
 * The awaitables complete at once: `__aenter__` / `__aexit__` return the context itself, whose
 * am_send returns the pending result (PYGEN_RETURN), so no Python frame and no coroutine object
 * is made for them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <pythread.h>
#include <frameobject.h>
#include <time.h>

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

/* What configure() was given: asyncpool's classes and constants. */
static struct {
    PyTypeObject *slots, *record, *lease, *pooled, *acquire_ctx, *asyncpg_conn;
    PyObject *ACTIVE, *RELEASED, *IDLE, *LEASED, *GIVEN_BACK;
    PyObject *spare_lease, *current_tasks, *monotonic, *py_returned, *deque_pop, *deque_append;
    PyObject *own_fetchval, *stmt_failed;
    /* Python coroutine functions used instead of the C awaitables when given (Python 3.12+: its
     * SEND no longer calls am_send, and a C awaitable's value comes back as a StopIteration
     * object; a coroutine's frame is pushed inline): ready(value), first_value(coro, lease). */
    PyObject *ready, *first_value;
    int configured;
} S;

/* Slot offsets. */
static struct {
    Py_ssize_t idle, clock, loop, loop_has_thread_id, fast, fast_statements, setup, track_leaks,
        leak_timer_unarmed, leaks, acquired_total, on_acquired, on_released, validate_after,
        may_retire;
} O;
static struct {
    Py_ssize_t check_at, conn, expires_at, last_used, lease, owner, place, probe, spare, stale,
        sync_after;
} R;
static struct {
    Py_ssize_t acquired_at, context, frame, lasti, record, reported, running, scoped, state, task,
        user;
} L;
static struct { Py_ssize_t lease, owner; } P;
static struct { Py_ssize_t conn, frame, lease, owner, timeout; } A;
static struct {
    Py_ssize_t protocol, aborted, section, top_xact, listeners, log_listeners, term_listeners,
        query_loggers, release_ctr;
} C;

static PyObject *ONE;  /* 1 */
static PyObject *str_is_connected, *str_is_cancelling, *str_is_in_transaction, *str_acquired,
    *str_thread_id, *str_arm, *str_retire_reason, *str_aenter, *str_aexit, *str_await,
    *str_execute, *str_fetchval, *str_throw, *str_close;

static Py_ssize_t
offset_of(PyTypeObject *type, const char *name)
{
    PyObject *d = PyObject_GetAttrString((PyObject *)type, name);
    if (d == NULL)
        return -1;
    if (!Py_IS_TYPE(d, &PyMemberDescr_Type)) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a slot", type->tp_name, name);
        Py_DECREF(d);
        return -1;
    }
    Py_ssize_t off = ((PyMemberDescrObject *)d)->d_member->offset;
    Py_DECREF(d);
    return off;
}

/* Replace a slot's value (a new reference to `v`). */
static inline void
set_slot(PyObject *obj, Py_ssize_t off, PyObject *v)
{
    PyObject *old = SLOT(obj, off);
    Py_INCREF(v);
    SLOT(obj, off) = v;
    Py_XDECREF(old);
}

/* A slot's value, or NULL (no exception) when unset. */
static inline PyObject *
get_slot(PyObject *obj, Py_ssize_t off)
{
    return SLOT(obj, off);
}

static inline int
is_true(PyObject *v)
{
    if (v == Py_True)
        return 1;
    if (v == Py_False || v == Py_None)
        return 0;
    return PyObject_IsTrue(v);
}

static PyObject *
clock_now(PyObject *owner)
{
    PyObject *clock = get_slot(owner, O.clock);
    if (clock == S.monotonic) {  /* time.monotonic itself: what it reads */
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return PyFloat_FromDouble((double)ts.tv_sec + (double)ts.tv_nsec * 1e-9);
    }
    return PyObject_CallNoArgs(clock);
}

/* The pool's loop is the running thread's (Slots.checkout_nowait's test): 1, 0, or -1. */
static int
on_pool_loop(PyObject *owner, PyObject *loop)
{
    if (loop == Py_None || get_slot(owner, O.loop_has_thread_id) != Py_True)
        return 0;  /* uvloop & co.: the Python path asks get_running_loop() */
    PyObject *tid = PyObject_GetAttr(loop, str_thread_id);
    if (tid == NULL)
        return -1;
    int same = PyLong_CheckExact(tid)
        && PyLong_AsUnsignedLong(tid) == PyThread_get_thread_ident();
    Py_DECREF(tid);
    return same;
}

static PyObject *
call_method0(PyObject *obj, PyObject *name)
{
    return PyObject_VectorcallMethod(name, &obj, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

static int
method_true(PyObject *obj, PyObject *name)
{
    PyObject *r = call_method0(obj, name);
    if (r == NULL)
        return -1;
    int t = is_true(r);
    Py_DECREF(r);
    return t;
}

/* driver._returned(conn) == CLEAN: 1 clean, 0 not, -1 error. Same reads and side effect. */
static int
returned_clean(PyObject *conn)
{
    if (!PyObject_TypeCheck(conn, S.asyncpg_conn)) {
        PyObject *r = PyObject_CallOneArg(S.py_returned, conn);
        if (r == NULL)
            return -1;
        long v = PyLong_AsLong(r);
        Py_DECREF(r);
        return v == -1 && PyErr_Occurred() ? -1 : v == 0;
    }
    PyObject *ctr = get_slot(conn, C.release_ctr);
    if (ctr == NULL)
        return 0;
    PyObject *next = PyNumber_Add(ctr, ONE);
    if (next == NULL)
        return -1;
    SLOT(conn, C.release_ctr) = next;
    Py_DECREF(ctr);
    PyObject *proto = get_slot(conn, C.protocol);
    PyObject *v = get_slot(conn, C.aborted);
    if (proto == NULL || v == NULL)
        return 0;
    int t = is_true(v);
    if (t != 0)
        return t < 0 ? -1 : 0;
    t = method_true(proto, str_is_connected);
    if (t != 1)
        return t;
    PyObject *section = get_slot(conn, C.section);
    if (section == NULL)
        return 0;
    PyObject *acq = PyObject_GetAttr(section, str_acquired);
    if (acq == NULL)
        return -1;
    t = is_true(acq);
    Py_DECREF(acq);
    if (t != 0)
        return t < 0 ? -1 : 0;
    if ((t = method_true(proto, str_is_cancelling)) != 0)
        return t < 0 ? -1 : 0;
    if ((t = method_true(proto, str_is_in_transaction)) != 0)
        return t < 0 ? -1 : 0;
    v = get_slot(conn, C.top_xact);
    if (v == NULL || v != Py_None)
        return 0;
    Py_ssize_t offs[] = {C.listeners, C.log_listeners, C.term_listeners, C.query_loggers};
    for (int i = 0; i < 4; i++) {
        v = get_slot(conn, offs[i]);
        if (v == NULL)
            return 0;
        if ((t = is_true(v)) != 0)
            return t < 0 ? -1 : 0;
    }
    return 1;
}

/* StopIteration(value) raised / its value taken: public-API forms of CPython's
 * _PyGen_SetStopIterationValue and _PyGen_FetchStopIterationValue (hidden in 3.13). */
static void
set_stop_value(PyObject *value)
{
    PyObject *e = PyObject_CallOneArg(PyExc_StopIteration, value);
    if (e != NULL) {
        PyErr_SetObject(PyExc_StopIteration, e);
        Py_DECREF(e);
    }
}

static int
fetch_stop_value(PyObject **value)
{
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    *value = Py_NewRef(exc != NULL ? ((PyStopIterationObject *)exc)->value : Py_None);
    Py_XDECREF(type);
    Py_XDECREF(exc);
    Py_XDECREF(tb);
    return 0;
}

/* ---- the C proxy (variant B): `_lease`, `_owner` and a fetchval of its own ------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *lease;
    PyObject *owner;
} Proxy;

static PyTypeObject ProxyType;

typedef struct {
    PyObject_HEAD
    PyObject *coro;  /* asyncpg's _execute(...) */
    PyObject *lease;
} Stmt;

static PyTypeObject StmtType;

/* A PooledConnection on the same lease, for what the C proxy leaves to the Python one. */
static PyObject *
python_proxy(PyObject *lease, PyObject *owner)
{
    PyObject *p = S.pooled->tp_alloc(S.pooled, 0);
    if (p == NULL)
        return NULL;
    set_slot(p, P.lease, lease);
    set_slot(p, P.owner, owner);
    return p;
}

static PyObject *
proxy_slow(Proxy *self, PyObject *name, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PyObject *p = python_proxy(self->lease, self->owner);
    if (p == NULL)
        return NULL;
    PyObject *m = PyObject_GetAttr(p, name);
    Py_DECREF(p);
    if (m == NULL)
        return NULL;
    PyObject *r = PyObject_Vectorcall(m, args, PyVectorcall_NARGS(nargsf), kwnames);
    Py_DECREF(m);
    return r;
}

static PyObject *
proxy_fetchval(Proxy *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *lease = self->lease;
    if (kwnames != NULL || nargs < 1 || Py_TYPE(lease) != S.lease
            || get_slot(lease, L.state) != S.ACTIVE)
        return proxy_slow(self, str_fetchval, args, nargsf, kwnames);
    PyObject *record = get_slot(lease, L.record);
    PyObject *owner = get_slot(record, R.owner);
    PyObject *loop = get_slot(owner, O.loop);
    int t = on_pool_loop(owner, loop);
    if (t < 0)
        return NULL;
    if (!t)
        return proxy_slow(self, str_fetchval, args, nargsf, kwnames);
    PyObject *task = PyDict_GetItemWithError(S.current_tasks, loop);
    if (task == NULL && PyErr_Occurred())
        return NULL;
    set_slot(lease, L.user, task ? task : Py_None);
    PyObject *conn = get_slot(record, R.conn);
    if (_PyType_Lookup(Py_TYPE(conn), str_fetchval) != S.own_fetchval)
        return proxy_slow(self, str_fetchval, args, nargsf, kwnames);
    if ((t = method_true(get_slot(record, R.probe), str_is_connected)) != 1)
        return t < 0 ? NULL : proxy_slow(self, str_fetchval, args, nargsf, kwnames);
    PyObject *rest = PyTuple_New(nargs - 1);
    if (rest == NULL)
        return NULL;
    for (Py_ssize_t i = 1; i < nargs; i++)
        PyTuple_SET_ITEM(rest, i - 1, Py_NewRef(args[i]));
    PyObject *call[] = {conn, args[0], rest, ONE, Py_None};
    PyObject *coro = PyObject_VectorcallMethod(str_execute, call,
                                               5 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(rest);
    if (coro == NULL)
        return NULL;  /* (asyncpg makes the coroutine without running anything) */
    if (S.first_value != Py_None) {
        PyObject *r = PyObject_CallFunctionObjArgs(S.first_value, coro, lease, NULL);
        Py_DECREF(coro);
        return r;
    }
    Stmt *st = PyObject_GC_New(Stmt, &StmtType);
    if (st == NULL) {
        Py_DECREF(coro);
        return NULL;
    }
    st->coro = coro;
    st->lease = Py_NewRef(lease);
    PyObject_GC_Track(st);
    return (PyObject *)st;
}

static PyObject *
proxy_getattro(PyObject *self, PyObject *name)
{
    /* The C proxy's own attributes, else the Python proxy's (refusal after release included). */
    PyObject *r = PyObject_GenericGetAttr(self, name);
    if (r != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError))
        return r;
    PyErr_Clear();
    Proxy *p = (Proxy *)self;
    PyObject *py = python_proxy(p->lease, p->owner);
    if (py == NULL)
        return NULL;
    r = PyObject_GetAttr(py, name);
    Py_DECREF(py);
    return r;
}

static int
proxy_traverse(Proxy *self, visitproc visit, void *arg)
{
    Py_VISIT(self->lease);
    Py_VISIT(self->owner);
    return 0;
}

static int
proxy_clear(Proxy *self)
{
    Py_CLEAR(self->lease);
    Py_CLEAR(self->owner);
    return 0;
}

static void
proxy_dealloc(Proxy *self)
{
    PyObject_GC_UnTrack(self);
    proxy_clear(self);
    Py_TYPE(self)->tp_free(self);
}

static PyMethodDef proxy_methods[] = {
    {"fetchval", (PyCFunction)(void (*)(void))proxy_fetchval, METH_FASTCALL | METH_KEYWORDS, NULL},
    {NULL},
};

static PyMemberDef proxy_members[] = {
    {"_lease", T_OBJECT_EX, offsetof(Proxy, lease), 0, NULL},
    {"_owner", T_OBJECT_EX, offsetof(Proxy, owner), 0, NULL},
    {NULL},
};

static PyTypeObject ProxyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_probe.Proxy",
    .tp_basicsize = sizeof(Proxy),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE,
    .tp_getattro = proxy_getattro,
    .tp_traverse = (traverseproc)proxy_traverse,
    .tp_clear = (inquiry)proxy_clear,
    .tp_dealloc = (destructor)proxy_dealloc,
    .tp_methods = proxy_methods,
    .tp_members = proxy_members,
};

/* fetchval's value from _execute's rows: rows[0][0], or None. */
static PyObject *
first_value(PyObject *rows)
{
    if (!PyList_Check(rows) || PyList_GET_SIZE(rows) == 0)
        Py_RETURN_NONE;
    return PySequence_GetItem(PyList_GET_ITEM(rows, 0), 0);
}

/* The statement failed: what the Python proxy's except clauses do (a Python helper), then
 * raise what it says. */
static void
stmt_failed(Stmt *self)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL)
        PyException_SetTraceback(value, tb);
    PyObject *raised = PyObject_CallFunctionObjArgs(S.stmt_failed, self->lease, value, NULL);
    if (raised != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(raised), raised);
        Py_DECREF(raised);
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

static PySendResult
stmt_send(Stmt *self, PyObject *arg, PyObject **result)
{
    PyObject *res;
    PySendResult st = PyIter_Send(self->coro, arg, &res);
    if (st == PYGEN_NEXT) {
        *result = res;
        return PYGEN_NEXT;
    }
    if (st == PYGEN_RETURN) {
        *result = first_value(res);
        Py_DECREF(res);
        return *result == NULL ? PYGEN_ERROR : PYGEN_RETURN;
    }
    stmt_failed(self);
    *result = NULL;
    return PYGEN_ERROR;
}

static PyObject *
stmt_iternext(Stmt *self)
{
    PyObject *res;
    PySendResult st = stmt_send(self, Py_None, &res);
    if (st == PYGEN_RETURN) {
        if (res != Py_None)
            set_stop_value(res);
        Py_DECREF(res);
        return NULL;
    }
    return res;
}

static PyObject *
stmt_throw(Stmt *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *res = PyObject_VectorcallMethod(
        str_throw, (PyObject *[]){self->coro, nargs > 0 ? args[0] : NULL,
                                  nargs > 1 ? args[1] : NULL, nargs > 2 ? args[2] : NULL},
        (1 + nargs) | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (res != NULL)
        return res;  /* yielded */
    if (PyErr_ExceptionMatches(PyExc_StopIteration)) {
        PyObject *rows;
        if (fetch_stop_value(&rows) < 0)
            return NULL;
        PyObject *v = first_value(rows);
        Py_DECREF(rows);
        if (v != NULL) {
            set_stop_value(v);
            Py_DECREF(v);
        }
        return NULL;
    }
    stmt_failed(self);
    return NULL;
}

static PyObject *
stmt_close(Stmt *self, PyObject *unused)
{
    return call_method0(self->coro, str_close);
}

static PyObject *
stmt_await(PyObject *self)
{
    return Py_NewRef(self);
}

static int
stmt_traverse(Stmt *self, visitproc visit, void *arg)
{
    Py_VISIT(self->coro);
    Py_VISIT(self->lease);
    return 0;
}

static int
stmt_clear(Stmt *self)
{
    Py_CLEAR(self->coro);
    Py_CLEAR(self->lease);
    return 0;
}

static void
stmt_dealloc(Stmt *self)
{
    PyObject_GC_UnTrack(self);
    stmt_clear(self);
    PyObject_GC_Del(self);
}

static PyAsyncMethods stmt_async = {
    .am_await = stmt_await,
    .am_send = (sendfunc)stmt_send,
};

static PyMethodDef stmt_methods[] = {
    {"throw", (PyCFunction)(void (*)(void))stmt_throw, METH_FASTCALL, NULL},
    {"close", (PyCFunction)stmt_close, METH_NOARGS, NULL},
    {NULL},
};

static PyTypeObject StmtType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_probe.Statement",
    .tp_basicsize = sizeof(Stmt),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_as_async = &stmt_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)stmt_iternext,
    .tp_traverse = (traverseproc)stmt_traverse,
    .tp_clear = (inquiry)stmt_clear,
    .tp_dealloc = (destructor)stmt_dealloc,
    .tp_methods = stmt_methods,
};

/* ---- the acquire context ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *owner, *timeout, *frame, *lease, *conn;
    PyObject *fallback;  /* the Python AcquireContext it handed over to, if any */
    PyObject *result;    /* what awaiting this object returns now (set by __aenter__/__aexit__) */
    PyTypeObject *proxy_type;  /* Proxy or a subclass; NULL: the Python PooledConnection */
} Ctx;

static PyTypeObject CtxType;

/* Hand the rest of this checkout to a Python AcquireContext in the same state. */
static PyObject *
handover(Ctx *self)
{
    if (self->fallback == NULL) {
        PyObject *py = S.acquire_ctx->tp_alloc(S.acquire_ctx, 0);
        if (py == NULL)
            return NULL;
        set_slot(py, A.owner, self->owner);
        set_slot(py, A.timeout, self->timeout);
        set_slot(py, A.frame, self->frame ? self->frame : Py_None);
        set_slot(py, A.lease, self->lease ? self->lease : Py_None);
        PyObject *conn = self->conn;
        if (conn != NULL && PyObject_TypeCheck(conn, &ProxyType)) {
            /* The Python path's clean exit points its proxy at GIVEN_BACK: give it one that the
             * C proxy follows (the C proxy is pointed at GIVEN_BACK too, below). */
            conn = NULL;
        }
        set_slot(py, A.conn, conn ? conn : Py_None);
        self->fallback = py;
    }
    return self->fallback;
}

static PyObject *
ctx_slow_enter(Ctx *self)
{
    PyObject *py = handover(self);
    if (py == NULL)
        return NULL;
    return call_method0(py, str_aenter);
}

static PyObject *
ctx_aenter(Ctx *self, PyObject *unused)
{
    PyObject *owner = self->owner;
    if (self->lease != NULL || self->fallback != NULL || Py_TYPE(owner) != S.slots
            || get_slot(owner, O.setup) != Py_None || get_slot(owner, O.fast) != Py_True)
        return ctx_slow_enter(self);
    PyObject *idle = get_slot(owner, O.idle);
    Py_ssize_t n = Py_SIZE(idle);
    if (n == 0)
        return ctx_slow_enter(self);
    PyObject *record = PySequence_GetItem(idle, n - 1);
    if (record == NULL)
        return NULL;
    PyObject *now = NULL, *lease = NULL;
    if (Py_TYPE(record) != S.record)
        goto slow;
    if ((now = clock_now(owner)) == NULL)
        goto error;
    PyObject *check_at = get_slot(record, R.check_at);
    if (!PyFloat_CheckExact(now) || check_at == NULL || !PyFloat_CheckExact(check_at)
            || PyFloat_AS_DOUBLE(now) >= PyFloat_AS_DOUBLE(check_at))
        goto slow;
    int t = method_true(get_slot(record, R.probe), str_is_connected);
    if (t < 0)
        goto error;
    if (!t)
        goto slow;
    PyObject *loop = get_slot(owner, O.loop);
    if ((t = on_pool_loop(owner, loop)) < 0)
        goto error;
    if (!t)
        goto slow;
    PyObject *popped = PyObject_Vectorcall(S.deque_pop, &idle, 1, NULL);
    if (popped == NULL)
        goto error;
    Py_DECREF(popped);
    lease = get_slot(record, R.spare);
    if (lease == NULL || lease == Py_None) {
        if ((lease = PyObject_CallOneArg(S.spare_lease, record)) == NULL)
            goto error;
    } else {
        Py_INCREF(lease);
        set_slot(record, R.spare, Py_None);
    }
    set_slot(lease, L.acquired_at, now);
    PyObject *task = PyDict_GetItemWithError(S.current_tasks, loop);
    if (task == NULL && PyErr_Occurred())
        goto error;
    set_slot(lease, L.task, task ? task : Py_None);
    if ((t = is_true(get_slot(owner, O.track_leaks))) < 0)
        goto error;
    if (t) {
        PyObject *context = PyContext_CopyCurrent();
        if (context == NULL)
            goto error;
        set_slot(lease, L.context, context);
        Py_DECREF(context);
    } else {
        set_slot(lease, L.context, Py_None);
    }
    PyObject *frame = self->frame;
    set_slot(lease, L.frame, frame ? frame : Py_None);
    PyObject *lasti = PyLong_FromLong(frame ? PyFrame_GetLasti((PyFrameObject *)frame) : 0);
    if (lasti == NULL)
        goto error;
    set_slot(lease, L.lasti, lasti);
    Py_DECREF(lasti);
    set_slot(lease, L.state, S.ACTIVE);
    set_slot(lease, L.scoped, Py_True);  /* (checkout_nowait's False, then __aenter__'s True) */
    set_slot(record, R.place, S.LEASED);
    set_slot(record, R.lease, lease);
    if ((t = is_true(get_slot(owner, O.leak_timer_unarmed))) < 0)
        goto error;
    if (t) {
        PyObject *r = PyObject_CallMethodOneArg(get_slot(owner, O.leaks), str_arm, now);
        if (r == NULL)
            goto error;
        Py_DECREF(r);
    }
    PyObject *total = PyNumber_Add(get_slot(owner, O.acquired_total), ONE);
    if (total == NULL)
        goto error;
    set_slot(owner, O.acquired_total, total);
    Py_DECREF(total);
    PyObject *hook = get_slot(owner, O.on_acquired);
    if (hook != Py_None) {
        PyObject *zero = PyFloat_FromDouble(0.0);
        PyObject *r = zero ? PyObject_CallOneArg(hook, zero) : NULL;
        Py_XDECREF(zero);
        if (r == NULL)
            goto error;
        Py_DECREF(r);
    }
    Py_CLEAR(self->frame);
    self->lease = lease;  /* (the reference taken above) */
    PyObject *conn;
    if (self->proxy_type != NULL) {
        Proxy *p = (Proxy *)self->proxy_type->tp_alloc(self->proxy_type, 0);  /* (tracked) */
        if (p == NULL)
            goto error_held;
        p->lease = Py_NewRef(lease);
        p->owner = Py_NewRef(owner);
        conn = (PyObject *)p;
    } else if ((conn = python_proxy(lease, owner)) == NULL) {
        goto error_held;
    }
    self->conn = conn;
    Py_DECREF(now);
    Py_DECREF(record);
    if (S.ready != Py_None)
        return PyObject_CallOneArg(S.ready, conn);
    self->result = Py_NewRef(conn);
    return Py_NewRef(self);
error_held:
    Py_DECREF(now);
    Py_DECREF(record);
    return NULL;
slow:
    Py_XDECREF(now);
    Py_DECREF(record);
    return ctx_slow_enter(self);
error:
    Py_XDECREF(lease);
    Py_XDECREF(now);
    Py_DECREF(record);
    return NULL;
}

static PyObject *
ctx_slow_exit(Ctx *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *py = handover(self);
    if (py == NULL)
        return NULL;
    PyObject *call[4] = {py, nargs > 0 ? args[0] : Py_None, nargs > 1 ? args[1] : Py_None,
                         nargs > 2 ? args[2] : Py_None};
    PyObject *coro = PyObject_VectorcallMethod(str_aexit, call, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                               NULL);
    if (coro != NULL && self->conn != NULL && PyObject_TypeCheck(self->conn, &ProxyType)) {
        /* The C proxy stays refused once the block has ended, whatever the return does. */
        Py_SETREF(((Proxy *)self->conn)->lease, Py_NewRef(S.GIVEN_BACK));
    }
    return coro;
}

static PyObject *
ctx_aexit(Ctx *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (self->fallback != NULL)
        return ctx_slow_exit(self, args, nargs);
    PyObject *lease = self->lease;
    if (lease == NULL || lease == S.GIVEN_BACK) {  /* (exited before: the Python path's no-op) */
        Py_XSETREF(self->result, Py_NewRef(Py_None));
        return Py_NewRef(self);
    }
    PyObject *exc = nargs > 1 ? args[1] : Py_None;
    PyObject *proxy = self->conn;
    if (exc != Py_None || Py_TYPE(lease) != S.lease || get_slot(lease, L.state) != S.ACTIVE
            || proxy == NULL)
        return ctx_slow_exit(self, args, nargs);
    PyObject *owner = self->owner;
    PyObject *record = get_slot(lease, L.record);
    PyObject *conn = get_slot(record, R.conn);
    PyObject *now = clock_now(owner);
    if (now == NULL)
        return NULL;
    PyObject *expires = get_slot(record, R.expires_at);
    PyObject *running = get_slot(lease, L.running);
    PyObject *sync_after = get_slot(record, R.sync_after);
    int t;
    if (!PyFloat_CheckExact(now) || expires == NULL || !PyFloat_CheckExact(expires)
            || get_slot(owner, O.fast_statements) != Py_True
            || get_slot(lease, L.reported) != Py_False
            || running == NULL || !PyLong_CheckExact(running) || _PyLong_Sign(running) != 0
            || PyFloat_AS_DOUBLE(now) >= PyFloat_AS_DOUBLE(expires)
            || get_slot(record, R.stale) != Py_False
            || sync_after == NULL || !PyLong_CheckExact(sync_after) || _PyLong_Sign(sync_after) != 0)
        goto slow;
    if ((t = is_true(get_slot(owner, O.may_retire))) < 0)
        goto error;
    if (t) {
        PyObject *reason = PyObject_GetAttr(conn, str_retire_reason);
        if (reason == NULL)
            goto error;
        t = is_true(reason);
        Py_DECREF(reason);
        if (t != 0)
            goto slow_or_error;
    }
    if ((t = returned_clean(conn)) != 1)
        goto slow_or_error;
    set_slot(lease, L.state, S.RELEASED);
    set_slot(lease, L.frame, Py_None);
    set_slot(lease, L.task, Py_None);
    set_slot(lease, L.user, Py_None);
    set_slot(lease, L.context, Py_None);
    if (PyObject_TypeCheck(proxy, &ProxyType))
        Py_SETREF(((Proxy *)proxy)->lease, Py_NewRef(S.GIVEN_BACK));
    else
        set_slot(proxy, P.lease, S.GIVEN_BACK);
    self->lease = Py_NewRef(S.GIVEN_BACK);  /* (the lease's reference goes to record.spare) */
    PyObject *old_spare = get_slot(record, R.spare);
    SLOT(record, R.spare) = lease;
    Py_XDECREF(old_spare);
    double now_d = PyFloat_AS_DOUBLE(now), expires_d = PyFloat_AS_DOUBLE(expires);
    PyObject *hook = get_slot(owner, O.on_released);
    if (hook != Py_None) {
        PyObject *used = PyFloat_FromDouble(
            now_d - PyFloat_AsDouble(get_slot(lease, L.acquired_at)));
        PyObject *r = used ? PyObject_CallOneArg(hook, used) : NULL;
        Py_XDECREF(used);
        if (r == NULL)
            goto error;
        Py_DECREF(r);
    }
    set_slot(record, R.lease, Py_None);
    set_slot(record, R.last_used, now);
    double check_at = now_d + PyFloat_AsDouble(get_slot(owner, O.validate_after));
    PyObject *check = PyFloat_FromDouble(check_at < expires_d ? check_at : expires_d);
    if (check == NULL)
        goto error;
    set_slot(record, R.check_at, check);
    Py_DECREF(check);
    set_slot(record, R.place, S.IDLE);
    PyObject *idle = get_slot(owner, O.idle);
    PyObject *call[2] = {idle, record};
    PyObject *r = PyObject_Vectorcall(S.deque_append, call, 2, NULL);
    if (r == NULL)
        goto error;
    Py_DECREF(r);
    Py_DECREF(now);
    Py_XSETREF(self->result, Py_NewRef(Py_None));
    return Py_NewRef(self);
slow_or_error:
    if (t < 0)
        goto error;
slow:
    Py_DECREF(now);
    return ctx_slow_exit(self, args, nargs);
error:
    Py_DECREF(now);
    return NULL;
}

static PyObject *
ctx_await(Ctx *self)
{
    if (self->result != NULL)
        return Py_NewRef(self);
    /* `conn = await pool.acquire()`: the Python path's. */
    PyObject *py = handover(self);
    if (py == NULL)
        return NULL;
    return call_method0(py, str_await);
}

static PySendResult
ctx_send(Ctx *self, PyObject *arg, PyObject **result)
{
    PyObject *r = self->result;
    if (r == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "nothing to await");
        *result = NULL;
        return PYGEN_ERROR;
    }
    self->result = NULL;
    *result = r;  /* (its reference) */
    return PYGEN_RETURN;
}

static PyObject *
ctx_iternext(Ctx *self)
{
    PyObject *r;
    if (ctx_send(self, Py_None, &r) == PYGEN_ERROR)
        return NULL;
    if (r != Py_None)
        set_stop_value(r);
    Py_DECREF(r);
    return NULL;
}

static PyObject *
ctx_enter(Ctx *self, PyObject *unused)
{
    PyErr_SetString(PyExc_TypeError, "pool.acquire() is asynchronous: write `async with "
                    "pool.acquire() as conn:`");
    return NULL;
}

static int
ctx_traverse(Ctx *self, visitproc visit, void *arg)
{
    Py_VISIT(self->owner);
    Py_VISIT(self->timeout);
    Py_VISIT(self->frame);
    Py_VISIT(self->lease);
    Py_VISIT(self->conn);
    Py_VISIT(self->fallback);
    Py_VISIT(self->result);
    Py_VISIT(self->proxy_type);
    return 0;
}

static int
ctx_clear(Ctx *self)
{
    Py_CLEAR(self->owner);
    Py_CLEAR(self->timeout);
    Py_CLEAR(self->frame);
    Py_CLEAR(self->lease);
    Py_CLEAR(self->conn);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->result);
    Py_CLEAR(self->proxy_type);
    return 0;
}

static void
ctx_dealloc(Ctx *self)
{
    PyObject_GC_UnTrack(self);
    ctx_clear(self);
    PyObject_GC_Del(self);
}

static PyAsyncMethods ctx_async = {
    .am_await = (unaryfunc)ctx_await,
    .am_send = (sendfunc)ctx_send,
};

static PyMethodDef ctx_methods[] = {
    {"__aenter__", (PyCFunction)ctx_aenter, METH_NOARGS, NULL},
    {"__aexit__", (PyCFunction)(void (*)(void))ctx_aexit, METH_FASTCALL, NULL},
    {"__enter__", (PyCFunction)ctx_enter, METH_NOARGS, NULL},
    {NULL},
};

static PyTypeObject CtxType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_probe.AcquireContext",
    .tp_basicsize = sizeof(Ctx),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_as_async = &ctx_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)ctx_iternext,
    .tp_traverse = (traverseproc)ctx_traverse,
    .tp_clear = (inquiry)ctx_clear,
    .tp_dealloc = (destructor)ctx_dealloc,
    .tp_methods = ctx_methods,
};

/* ---- pool.acquire as a C callable ---------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *owner;     /* the pool's Slots */
    PyObject *original;  /* the pool's own bound acquire, for a call with arguments */
    PyObject *unset;     /* UNSET: the timeout when none is given */
    PyTypeObject *proxy_type;
    vectorcallfunc vectorcall;
} Acquirer;

static PyObject *
acquirer_call(Acquirer *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) || kwnames != NULL)
        return PyObject_Vectorcall(self->original, args, nargsf, kwnames);
    Ctx *ctx = PyObject_GC_New(Ctx, &CtxType);
    if (ctx == NULL)
        return NULL;
    ctx->owner = Py_NewRef(self->owner);
    ctx->timeout = Py_NewRef(self->unset);
    /* The caller's frame, as Pool.acquire's sys._getframe(1): a C call has no frame between. */
    PyFrameObject *frame = PyEval_GetFrame();
    ctx->frame = (PyObject *)frame;
    Py_XINCREF(frame);
    ctx->lease = ctx->conn = ctx->fallback = ctx->result = NULL;
    ctx->proxy_type = self->proxy_type;
    Py_XINCREF(ctx->proxy_type);
    PyObject_GC_Track(ctx);
    return (PyObject *)ctx;
}

static PyObject *
acquirer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *owner, *original, *unset;
    PyObject *proxy_type = Py_None;
    if (!S.configured) {
        PyErr_SetString(PyExc_RuntimeError, "call configure() first");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOO|O", &owner, &original, &unset, &proxy_type))
        return NULL;
    if (proxy_type != Py_None && !(PyType_Check(proxy_type)
            && PyType_IsSubtype((PyTypeObject *)proxy_type, &ProxyType))) {
        PyErr_SetString(PyExc_TypeError, "proxy_type: _probe.Proxy, a subclass of it, or None");
        return NULL;
    }
    Acquirer *self = (Acquirer *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->owner = Py_NewRef(owner);
    self->original = Py_NewRef(original);
    self->unset = Py_NewRef(unset);
    self->proxy_type = proxy_type == Py_None ? NULL : (PyTypeObject *)Py_NewRef(proxy_type);
    self->vectorcall = (vectorcallfunc)acquirer_call;
    return (PyObject *)self;
}

static int
acquirer_traverse(Acquirer *self, visitproc visit, void *arg)
{
    Py_VISIT(self->owner);
    Py_VISIT(self->original);
    Py_VISIT(self->unset);
    Py_VISIT(self->proxy_type);
    return 0;
}

static int
acquirer_clear(Acquirer *self)
{
    Py_CLEAR(self->owner);
    Py_CLEAR(self->original);
    Py_CLEAR(self->unset);
    Py_CLEAR(self->proxy_type);
    return 0;
}

static void
acquirer_dealloc(Acquirer *self)
{
    PyObject_GC_UnTrack(self);
    acquirer_clear(self);
    Py_TYPE(self)->tp_free(self);
}

static PyTypeObject AcquirerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_probe.Acquirer",
    .tp_basicsize = sizeof(Acquirer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Acquirer, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = acquirer_new,
    .tp_traverse = (traverseproc)acquirer_traverse,
    .tp_clear = (inquiry)acquirer_clear,
    .tp_dealloc = (destructor)acquirer_dealloc,
};

/* ---- configure(): asyncpool's classes and constants, and the slots' offsets ----------------- */

#define OFF(store, type, name) \
    if (((store) = offset_of((type), (name))) < 0) return NULL;

static PyObject *
configure(PyObject *module, PyObject *kw)
{
    const char *types[] = {"Slots", "ConnectionRecord", "Lease", "PooledConnection",
                           "AcquireContext", "Connection"};
    PyTypeObject **dest[] = {&S.slots, &S.record, &S.lease, &S.pooled, &S.acquire_ctx,
                             &S.asyncpg_conn};
    for (int i = 0; i < 6; i++) {
        PyObject *t = PyDict_GetItemString(kw, types[i]);
        if (t == NULL || !PyType_Check(t)) {
            PyErr_Format(PyExc_TypeError, "configure: %s", types[i]);
            return NULL;
        }
        *dest[i] = (PyTypeObject *)Py_NewRef(t);
    }
    const char *objs[] = {"ACTIVE", "RELEASED", "IDLE", "LEASED", "GIVEN_BACK", "spare_lease",
                          "current_tasks", "monotonic", "returned", "deque_pop", "deque_append",
                          "own_fetchval", "stmt_failed", "ready", "first_value"};
    PyObject **odest[] = {&S.ACTIVE, &S.RELEASED, &S.IDLE, &S.LEASED, &S.GIVEN_BACK,
                          &S.spare_lease, &S.current_tasks, &S.monotonic, &S.py_returned,
                          &S.deque_pop, &S.deque_append, &S.own_fetchval, &S.stmt_failed, &S.ready, &S.first_value};
    for (int i = 0; i < 15; i++) {
        PyObject *o = PyDict_GetItemString(kw, objs[i]);
        if (o == NULL) {
            PyErr_Format(PyExc_TypeError, "configure: %s", objs[i]);
            return NULL;
        }
        *odest[i] = Py_NewRef(o);
    }
    if (!PyDict_CheckExact(S.current_tasks)) {
        PyErr_SetString(PyExc_TypeError, "configure: current_tasks must be a dict");
        return NULL;
    }
    OFF(O.idle, S.slots, "idle") OFF(O.clock, S.slots, "clock") OFF(O.loop, S.slots, "loop")
    OFF(O.loop_has_thread_id, S.slots, "loop_has_thread_id") OFF(O.fast, S.slots, "fast")
    OFF(O.fast_statements, S.slots, "fast_statements") OFF(O.setup, S.slots, "setup")
    OFF(O.track_leaks, S.slots, "track_leaks")
    OFF(O.leak_timer_unarmed, S.slots, "leak_timer_unarmed") OFF(O.leaks, S.slots, "leaks")
    OFF(O.acquired_total, S.slots, "acquired_total") OFF(O.on_acquired, S.slots, "on_acquired")
    OFF(O.on_released, S.slots, "on_released") OFF(O.validate_after, S.slots, "validate_after")
    OFF(O.may_retire, S.slots, "_may_retire")
    OFF(R.check_at, S.record, "check_at") OFF(R.conn, S.record, "conn")
    OFF(R.expires_at, S.record, "expires_at") OFF(R.last_used, S.record, "last_used")
    OFF(R.lease, S.record, "lease") OFF(R.owner, S.record, "owner")
    OFF(R.place, S.record, "place") OFF(R.probe, S.record, "probe")
    OFF(R.spare, S.record, "spare") OFF(R.stale, S.record, "stale")
    OFF(R.sync_after, S.record, "sync_after")
    OFF(L.acquired_at, S.lease, "acquired_at") OFF(L.context, S.lease, "context")
    OFF(L.frame, S.lease, "frame") OFF(L.lasti, S.lease, "lasti")
    OFF(L.record, S.lease, "record") OFF(L.reported, S.lease, "reported")
    OFF(L.running, S.lease, "running") OFF(L.scoped, S.lease, "scoped")
    OFF(L.state, S.lease, "state") OFF(L.task, S.lease, "task") OFF(L.user, S.lease, "user")
    OFF(P.lease, S.pooled, "_lease") OFF(P.owner, S.pooled, "_owner")
    OFF(A.conn, S.acquire_ctx, "_conn") OFF(A.frame, S.acquire_ctx, "_frame")
    OFF(A.lease, S.acquire_ctx, "_lease") OFF(A.owner, S.acquire_ctx, "_owner")
    OFF(A.timeout, S.acquire_ctx, "_timeout")
    OFF(C.protocol, S.asyncpg_conn, "_protocol") OFF(C.aborted, S.asyncpg_conn, "_aborted")
    OFF(C.section, S.asyncpg_conn, "_stmt_exclusive_section")
    OFF(C.top_xact, S.asyncpg_conn, "_top_xact") OFF(C.listeners, S.asyncpg_conn, "_listeners")
    OFF(C.log_listeners, S.asyncpg_conn, "_log_listeners")
    OFF(C.term_listeners, S.asyncpg_conn, "_termination_listeners")
    OFF(C.query_loggers, S.asyncpg_conn, "_query_loggers")
    OFF(C.release_ctr, S.asyncpg_conn, "_pool_release_ctr")
    S.configured = 1;
    Py_RETURN_NONE;
}

static PyObject *
configure_kw(PyObject *module, PyObject *args, PyObject *kw)
{
    if (kw == NULL || PyTuple_GET_SIZE(args) != 0) {
        PyErr_SetString(PyExc_TypeError, "configure() takes keyword arguments only");
        return NULL;
    }
    return configure(module, kw);
}

static PyMethodDef module_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure_kw, METH_VARARGS | METH_KEYWORDS, NULL},
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_probe", NULL, -1, module_methods,
};

PyMODINIT_FUNC
PyInit__probe(void)
{
    struct { PyObject **s; const char *v; } names[] = {
        {&str_is_connected, "is_connected"}, {&str_is_cancelling, "_is_cancelling"},
        {&str_is_in_transaction, "is_in_transaction"}, {&str_acquired, "_acquired"},
        {&str_thread_id, "_thread_id"}, {&str_arm, "arm"}, {&str_retire_reason, "retire_reason"},
        {&str_aenter, "__aenter__"}, {&str_aexit, "__aexit__"}, {&str_await, "__await__"},
        {&str_execute, "_execute"}, {&str_fetchval, "fetchval"}, {&str_throw, "throw"},
        {&str_close, "close"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if ((*names[i].s = PyUnicode_InternFromString(names[i].v)) == NULL)
            return NULL;
    if ((ONE = PyLong_FromLong(1)) == NULL)
        return NULL;
    if (PyType_Ready(&CtxType) < 0 || PyType_Ready(&AcquirerType) < 0
            || PyType_Ready(&ProxyType) < 0 || PyType_Ready(&StmtType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Acquirer", (PyObject *)&AcquirerType) < 0
            || PyModule_AddObjectRef(m, "AcquireContext", (PyObject *)&CtxType) < 0
            || PyModule_AddObjectRef(m, "Proxy", (PyObject *)&ProxyType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
