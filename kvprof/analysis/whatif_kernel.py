"""Compiled kernels of `kvprof whatif` (numba): the schedule builder's pass over one chunk
of block events, and the replay of a schedule through one simulated pool.

Imported only by :mod:`kvprof.analysis.whatif` when an extraction or a replay runs (never
by ``kvprof --help``).  State lives in a few numpy arrays (scalars in an int64 vector,
per-request and per-block fields as the columns of 2-D arrays) so that one call runs a
whole chunk or a whole replay without the interpreter, and the helpers pass a handful of
arrays, not a record of dozens (which numba passes member by member, slowly, and compiles
slowly).  The kernels are cached on disk (``cache=True``): the first run after an install
compiles them, later processes load them.  Where the package's ``__pycache__`` and numba's
user cache are not writable, the cache goes under the system temporary directory; where
no cache can be written at all, the kernels are compiled in each process.

The semantics are those of the pure-Python replay that tests/whatif_reference.py keeps
(the tests hold the two equal, metric for metric): read that first.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np

if TYPE_CHECKING:
    from typing import TypeAlias

    # a kernel's scalar argument: an int64 to numba, whether a Python int or a numpy int64 goes in.  Its scalar
    # results are Any: they come out of the arrays, whose elements numpy's stubs type as Any
    Int: TypeAlias = int | np.int64

_F = TypeVar("_F", bound=Callable[..., Any])


def _writable(d: str) -> bool:
    try:
        os.makedirs(d, exist_ok=True)
    except OSError:
        return False
    return os.access(d, os.W_OK | os.X_OK)


def cache_dir_fallback() -> str | None:
    """numba caches next to the source (``__pycache__``), else in the user's cache directory;
    when neither is writable (a read-only install, a read-only home), point it at a
    per-user directory under the temporary directory.  Before numba is imported; returns
    the directory chosen, None when numba's own choice stands."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    if _writable(os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")):
        return None
    user = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if _writable(os.path.join(user, "numba")):
        return None
    uid = os.getuid() if hasattr(os, "getuid") else 0
    d = os.path.join(tempfile.gettempdir(), f"kvprof-numba-cache-{uid}")
    if _writable(d):
        os.environ["NUMBA_CACHE_DIR"] = d
        return d
    return None


cache_dir_fallback()
import numba  # noqa: E402
import numba.extending  # noqa: E402
import numba.np.arrayobj  # noqa: E402

# numba's functions carry no annotations: the same objects, typed for the type checker as the callables they are
_njit: Callable[..., Any] = numba.njit
intrinsic: Callable[[Callable[..., Any]], Any] = numba.extending.intrinsic
make_array: Callable[..., Any] = numba.np.arrayobj.make_array
populate_array: Callable[..., Any] = numba.np.arrayobj.populate_array


def cache_is_cold(*functions: Any) -> bool:
    """Whether any of these kernel functions has no cache index yet (its first call will
    compile).  False when that cannot be told."""
    for f in functions:
        try:
            path = f._cache._cache_file._index_path
        except AttributeError:  # no cache, or numba's private layout moved
            continue
        if not os.path.exists(path):
            return True
    return False


def jit(fn: _F) -> _F:
    """``njit(cache=True, nogil=True)``; without the cache when numba finds no place for it.
    Typed as the function it compiles (numba's dispatcher is called with the same arguments)."""
    try:
        return cast(_F, _njit(cache=True, nogil=True)(fn))
    except (RuntimeError, OSError):  # "cannot cache function ...: no locator available"
        return cast(_F, _njit(nogil=True)(fn))


@intrinsic
def _borrow(typingctx: Any, arr: Any) -> tuple[Any, Callable[..., Any]]:
    """A view of ``arr`` without its reference count (a null meminfo): numba increments and
    decrements the count of every array argument at every call, atomically, which took half
    of a replay.  The caller keeps the owner alive for as long as the view is used."""

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        src = make_array(arr)(context, builder, value=args[0])
        out = make_array(arr)(context, builder)
        populate_array(out, data=src.data, shape=src.shape, strides=src.strides, itemsize=src.itemsize, meminfo=None)
        return out._getvalue()

    return arr(arr), codegen


i64 = np.int64  # every scalar a kernel function is called with is cast so: one compiled version each
# (a literal argument would compile a version of its own, per value)

# -- shared constants (numba freezes module globals at compile time) -------------------------------
# schedule operations
(
    OP_STEP,
    OP_QUERY,
    OP_LOOKUP,
    OP_GROW,
    OP_CACHE,
    OP_FREE,
    OP_STATE,
    OP_PREEMPT,
    OP_FINISH,
    OP_FAIL,
    OP_FALLOC,
    OP_FFREE,
    OP_NOP,
    OP_TIME,
) = range(14)
OP_NAMES = (
    "step",
    "query",
    "lookup",
    "grow",
    "cache",
    "free",
    "state",
    "preempt",
    "finish",
    "fail",
    "falloc",
    "ffree",
    "nop",
    "time",
)
# event kinds (kvprof.trace.format.EventKind)
K_ALLOC, K_FREE, K_HIT, K_CACHE, K_EVICT, K_RESERVE = 1, 2, 3, 4, 5, 6
K_QUERY, K_STATE, K_FINISH, K_PREEMPT, K_FAIL, K_STEP = 11, 12, 13, 14, 15, 20
I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1
U32_MASK = (1 << 32) - 1
EMPTY = -1


@jit
def _c32(x: Int) -> Any:
    """Clamp to int32 (token counts: nothing real comes near)."""
    if x > I32_MAX:
        return I32_MAX
    if x < I32_MIN:
        return I32_MIN
    return x


@jit
def _mix(x: Int) -> Any:
    """splitmix64's finaliser: a non-negative hash of an int64."""
    z = np.uint64(x)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.int64(z >> np.uint64(1))


# -- an int64 -> int hash map (open addressing, linear probing, backward-shift deletion) -------------
# keys >= 0; EMPTY marks a free slot.  The caller keeps the load at most one half.
@jit
def hm_find(keys: np.ndarray, key: Int) -> Any:
    """The slot holding ``key``, or -1 - the free slot where it would go."""
    mask = len(keys) - 1
    h = _mix(i64(key)) & mask
    while True:
        k = keys[h]
        if k == key:
            return h
        if k == EMPTY:
            return -1 - h
        h = (h + 1) & mask


@jit
def hm_delete(keys: np.ndarray, vals: np.ndarray, i: Int) -> None:
    mask = len(keys) - 1
    j = i
    while True:
        j = (j + 1) & mask
        k = keys[j]
        if k == EMPTY:
            break
        h = _mix(i64(k)) & mask
        # the entry at j stays when its home slot lies cyclically in (i, j]
        if (i <= j and i < h <= j) or (i > j and (h > i or h <= j)):
            continue
        keys[i] = k
        vals[i] = vals[j]
        i = j
    keys[i] = EMPTY


@jit
def hm_rehash(okeys: np.ndarray, ovals: np.ndarray, nkeys: np.ndarray, nvals: np.ndarray) -> None:
    for i in range(len(okeys)):
        k = okeys[i]
        if k != EMPTY:
            s = -1 - hm_find(nkeys, i64(k))
            nkeys[s] = k
            nvals[s] = ovals[i]


# == the schedule builder ===========================================================================
# One pool's events, one chunk at a time, into operations: ``code`` (uint8) and ``ops``
# (int32 rows: dt = nanoseconds since the previous operation as uint32 bits, r = the request
# as a dense local index, 0 for none, a, b), and a ``payload`` (int32) the replay walks with
# a cursor.  Per operation:
#
#   STEP                                QUERY    r, a=queried tokens
#   LOOKUP  r, a=recorded hit tokens; payload [query hint]
#   GROW    r, a=table length after (recorded blocks); payload [tokens of the next state or -1, query hint]
#   CACHE   r=owner, a=tokens covered, b=count; payload the owner's positions
#   FREE    r=holder, a=whole table, b=count; payload the holder's positions
#   STATE   r, a=filled tokens, b=tokens its table is for
#   PREEMPT r, a=1: the decision (before the free that preceded the report), 0: the report
#   FINISH  r                           FAIL     r, a=blocks wanted; payload [tokens of the next state or -1, query hint]
#   FALLOC  b=count; payload ids        FFREE    b=count; payload ids (blocks no request took)
#   NOP     a slot before each whole-table free, where a later preemption report puts its decision
#   TIME    a gap that does not fit dt: (a << 32) + dt nanoseconds
#
# The look-aheads of the pure-Python extraction are patches: an allocation's payload slots
# wait in per-request lists until the request's next state (tokens) or query (hint)
# arrives, and are dropped, unpatched, at its next preemption or finish.
(
    S_NOPS,
    S_NPAY,
    S_TPREV,
    S_HAVE_T,
    S_TFIRST,
    S_TLAST,
    S_CACHED,
    S_UNS_HIT,
    S_UNS_FREE,
    S_UNS_EVICT,
    S_NUNION,
    S_PFREE,
    S_PTOP,
    S_HM_COUNT,
    S_NREAL,
    S_NFALLOC,
    S_EVENTS,
    S_STATES,
    S_FMAX,
    S_FALLOCMAX,
) = range(20)
N_BUILD_SCALARS = 24
# per-request columns (int64) of the builder
(Q_TLEN, Q_FREED, Q_LASTFREE, Q_TOUCH, Q_FINAL, Q_HASFINAL, Q_MAXTOK, Q_PENDT, Q_PENDQ, Q_GRP) = range(10)
N_BUILD_REQ = 10
BUILD_REQ_INIT = (0, 0, -1, -1, 0, 0, 0, -1, -1, -1)
# per-block columns (int32) of the builder
(W_OWNER, W_OWNPOS, W_FOREIGN, W_RESERVED) = range(4)
N_BUILD_BLOCK = 4
BUILD_BLOCK_INIT = (-1, -1, 0, 0)
# scratch columns (int64), one row per id of an event
(X_H, X_P, X_GKEY, X_GCNT, X_GMAX, X_GSTART, X_GFILL) = range(7)


@jit
def _emit(st: np.ndarray, code: np.ndarray, ops: np.ndarray, t: Int, c: Int, r: Int, a: Int, b: Int) -> Any:
    """Append an operation at time t (a TIME operation first when the gap does not fit)."""
    i = st[S_NOPS]
    d = t - st[S_TPREV]
    if d < 0 or d > U32_MASK:
        code[i] = OP_TIME
        ops[i, 0] = np.int32(np.uint32(d & U32_MASK))
        ops[i, 1] = 0
        ops[i, 2] = d >> 32
        ops[i, 3] = 0
        i += 1
        d = 0
    code[i] = c
    ops[i, 0] = np.int32(np.uint32(d))
    ops[i, 1] = r
    ops[i, 2] = a
    ops[i, 3] = b
    st[S_TPREV] = t
    st[S_NOPS] = i + 1
    st[S_NREAL] += 1
    return i


@jit
def _emit_slot(st: np.ndarray, code: np.ndarray, ops: np.ndarray, t: Int) -> Any:
    """A NOP slot right before the operation to come (which carries the time)."""
    i = st[S_NOPS]
    d = t - st[S_TPREV]
    if d < 0 or d > U32_MASK:  # the gap goes first, so that the slot sits right before the operation
        code[i] = OP_TIME
        ops[i, 0] = np.int32(np.uint32(d & U32_MASK))
        ops[i, 1] = 0
        ops[i, 2] = d >> 32
        ops[i, 3] = 0
        i += 1
        st[S_TPREV] = t
    code[i] = OP_NOP
    ops[i, 0] = 0
    ops[i, 1] = 0
    ops[i, 2] = 0
    ops[i, 3] = 0
    st[S_NOPS] = i + 1
    return i


@jit
def _pend_add(st: np.ndarray, RQ: np.ndarray, PN: np.ndarray, col: Int, r: Int, p: Int) -> None:
    node = st[S_PFREE]
    if node >= 0:
        st[S_PFREE] = PN[node, 1]
    else:
        node = st[S_PTOP]
        st[S_PTOP] = node + 1
    PN[node, 0] = p
    PN[node, 1] = RQ[r, col]
    RQ[r, col] = node


@jit
def _pend_resolve(
    st: np.ndarray, RQ: np.ndarray, PN: np.ndarray, pay: np.ndarray, col: Int, r: Int, value: Int, patch: Int
) -> None:
    node = RQ[r, col]
    while node >= 0:
        nxt = PN[node, 1]
        if patch:
            pay[PN[node, 0]] = value
        PN[node, 1] = st[S_PFREE]
        st[S_PFREE] = node
        node = nxt
    RQ[r, col] = -1


@jit
def _group(RQ: np.ndarray, X: np.ndarray, key: Int, ng: Int) -> Any:
    """The group of ``key`` (a request) in this event: made when new (then == ng)."""
    g = RQ[key, Q_GRP]
    if g < 0:
        g = ng
        RQ[key, Q_GRP] = g
        X[g, X_GKEY] = key
        X[g, X_GCNT] = 0
        X[g, X_GMAX] = -1
    return g


@jit
def _layout(st: np.ndarray, pay: np.ndarray, X: np.ndarray, ng: Int, cnt: Int) -> None:
    """Payload ranges for the ng groups, in group order; each id's value to its group's range."""
    base = st[S_NPAY]
    for g in range(ng):
        X[g, X_GSTART] = base
        X[g, X_GFILL] = 0
        base += X[g, X_GCNT]
    for x in range(cnt):
        g = X[x, X_H]
        if g >= 0:
            pay[X[g, X_GSTART] + X[g, X_GFILL]] = X[x, X_P]
            X[g, X_GFILL] += 1
    st[S_NPAY] = base


@jit
def build_chunk(
    st: np.ndarray,
    code: np.ndarray,
    ops: np.ndarray,
    pay: np.ndarray,
    BLK: np.ndarray,
    RQ: np.ndarray,
    PN: np.ndarray,
    HMK: np.ndarray,
    HMV: np.ndarray,
    UN: np.ndarray,
    X: np.ndarray,
    B0: Int,
    t: np.ndarray,
    kind: np.ndarray,
    rl: np.ndarray,
    arg: np.ndarray,
    arg2: np.ndarray,
    nn: np.ndarray,
    ids: np.ndarray,
) -> None:
    """Feed one chunk (one pool's events, time-ordered; ``rl`` the local request, 0 none)."""
    off = 0
    for i in range(len(t)):
        k = kind[i]
        r = rl[i]
        ti = t[i]
        cnt = nn[i]
        lo = off
        off += cnt
        if st[S_HAVE_T] == 0:
            st[S_HAVE_T] = 1
            st[S_TFIRST] = ti
            st[S_TPREV] = ti
        st[S_TLAST] = ti
        st[S_EVENTS] += 1
        if k == K_STATE:
            f = arg[i]
            tok = f + max(arg2[i] - (-((-f) // B0)), 0) * B0  # filled, plus whole blocks held beyond them
            st[S_STATES] += 1
            _emit(st, code, ops, i64(ti), i64(OP_STATE), i64(r), i64(_c32(i64(f))), i64(_c32(i64(tok))))
            RQ[r, Q_FINAL] = f
            RQ[r, Q_HASFINAL] = 1
            RQ[r, Q_MAXTOK] = max(RQ[r, Q_MAXTOK], f, tok)
            if r != 0:
                _pend_resolve(st, RQ, PN, pay, i64(Q_PENDT), i64(r), i64(_c32(i64(tok))), i64(True))
        elif k == K_STEP:
            _emit(st, code, ops, i64(ti), i64(OP_STEP), i64(0), i64(0), i64(0))
        elif k == K_ALLOC or k == K_HIT:
            if r == 0:
                if k == K_ALLOC:
                    for x in range(lo, lo + cnt):
                        BLK[ids[x], W_FOREIGN] = 1
                        st[S_FMAX] = max(st[S_FMAX], ids[x] + 1)
                    _emit(st, code, ops, i64(ti), i64(OP_FALLOC), i64(0), i64(0), i64(cnt))
                    p = st[S_NPAY]
                    for x in range(cnt):
                        pay[p + x] = ids[lo + x]
                    st[S_NPAY] = p + cnt
                    st[S_NFALLOC] += cnt
                    st[S_FALLOCMAX] = max(st[S_FALLOCMAX], cnt)
                else:
                    st[S_UNS_HIT] += 1
                continue
            if RQ[r, Q_FREED] >= RQ[r, Q_TLEN]:  # a new admission
                RQ[r, Q_TLEN] = 0
                RQ[r, Q_FREED] = 0
            L = RQ[r, Q_TLEN]
            if k == K_HIT:
                oi = _emit(st, code, ops, i64(ti), i64(OP_LOOKUP), i64(r), i64(_c32(i64(cnt * B0))), i64(0))
                p = st[S_NPAY]
                pay[p] = -1
                st[S_NPAY] = p + 1
                _pend_add(st, RQ, PN, i64(Q_PENDQ), i64(r), i64(p))
                RQ[r, Q_MAXTOK] = max(RQ[r, Q_MAXTOK], cnt * B0)
                # a hit of block j computed as block j of request o: the two token prefixes are
                # equal to the end of block j; each owner's furthest such block
                ng = 0
                for x in range(cnt):
                    b = ids[lo + x]
                    j = L + x
                    o = BLK[b, W_OWNER]
                    if o >= 0 and o != r and BLK[b, W_OWNPOS] == j:
                        g = _group(RQ, X, i64(o), i64(ng))
                        if g == ng:
                            ng += 1
                        if j > X[g, X_GMAX]:
                            X[g, X_GMAX] = j
                for g in range(ng):
                    o = X[g, X_GKEY]
                    u = st[S_NUNION]
                    UN[u, 0] = r
                    UN[u, 1] = o
                    UN[u, 2] = X[g, X_GMAX]
                    st[S_NUNION] = u + 1
                    RQ[o, Q_GRP] = -1
            else:
                oi = _emit(st, code, ops, i64(ti), i64(OP_GROW), i64(r), i64(_c32(i64(L + cnt))), i64(0))
                p = st[S_NPAY]
                pay[p] = -1
                pay[p + 1] = -1
                st[S_NPAY] = p + 2
                _pend_add(st, RQ, PN, i64(Q_PENDT), i64(r), i64(p))
                _pend_add(st, RQ, PN, i64(Q_PENDQ), i64(r), i64(p + 1))
                RQ[r, Q_MAXTOK] = max(RQ[r, Q_MAXTOK], (L + cnt) * B0)
            RQ[r, Q_TOUCH] = oi
            for x in range(cnt):
                b = ids[lo + x]
                if k == K_ALLOC:
                    BLK[b, W_OWNER] = r
                    BLK[b, W_OWNPOS] = L + x
                    BLK[b, W_FOREIGN] = 0
                key = (np.int64(r) << 32) | np.int64(b)
                s = hm_find(HMK, i64(key))
                if s < 0:
                    s = -1 - s
                    HMK[s] = key
                    st[S_HM_COUNT] += 1
                HMV[s] = L + x
            RQ[r, Q_TLEN] = L + cnt
        elif k == K_FREE:
            # who holds each block (the caller, else the request that took it last), grouped by
            # holder in order of first appearance; blocks taken without a request: one group
            ng = 0
            fg = -1
            for x in range(cnt):
                b = ids[lo + x]
                if BLK[b, W_FOREIGN] != 0:
                    if fg < 0:
                        fg = ng
                        ng += 1
                        X[fg, X_GKEY] = -1
                        X[fg, X_GCNT] = 0
                    X[x, X_H] = fg
                    X[x, X_P] = b
                    X[fg, X_GCNT] += 1
                    continue
                hold = -1
                s = -1
                if r != 0:
                    s = hm_find(HMK, i64((np.int64(r) << 32) | np.int64(b)))
                    if s >= 0:
                        hold = r
                if hold < 0:
                    o = BLK[b, W_OWNER]
                    if o >= 0:
                        s = hm_find(HMK, i64((np.int64(o) << 32) | np.int64(b)))
                        if s >= 0:
                            hold = o
                if hold < 0:
                    st[S_UNS_FREE] += 1
                    X[x, X_H] = -1
                    continue
                pos = HMV[s]
                hm_delete(HMK, HMV, i64(s))
                st[S_HM_COUNT] -= 1
                g = _group(RQ, X, i64(hold), i64(ng))
                if g == ng:
                    ng += 1
                X[x, X_H] = g
                X[x, X_P] = pos
                X[g, X_GCNT] += 1
            _layout(st, pay, X, i64(ng), i64(cnt))
            for g in range(ng):
                h = X[g, X_GKEY]
                c = X[g, X_GCNT]
                if h < 0:
                    for x in range(c):
                        BLK[pay[X[g, X_GSTART] + x], W_FOREIGN] = 0
                    _emit(st, code, ops, i64(ti), i64(OP_FFREE), i64(0), i64(0), i64(c))
                    continue
                RQ[h, Q_GRP] = -1
                RQ[h, Q_FREED] += c
                whole = RQ[h, Q_FREED] >= RQ[h, Q_TLEN]
                if whole:
                    RQ[h, Q_LASTFREE] = _emit_slot(st, code, ops, i64(ti))
                RQ[h, Q_TOUCH] = _emit(st, code, ops, i64(ti), i64(OP_FREE), i64(h), i64(1 if whole else 0), i64(c))
        elif k == K_CACHE:
            st[S_CACHED] = 1
            ng = 0
            for x in range(cnt):
                b = ids[lo + x]
                o = BLK[b, W_OWNER]
                if o < 0:
                    X[x, X_H] = -1
                    continue
                g = _group(RQ, X, i64(o), i64(ng))
                if g == ng:
                    ng += 1
                pos = BLK[b, W_OWNPOS]
                X[x, X_H] = g
                X[x, X_P] = pos
                X[g, X_GCNT] += 1
                if pos > X[g, X_GMAX]:
                    X[g, X_GMAX] = pos
            _layout(st, pay, X, i64(ng), i64(cnt))
            for g in range(ng):
                o = X[g, X_GKEY]
                RQ[o, Q_GRP] = -1
                RQ[o, Q_TOUCH] = _emit(
                    st,
                    code,
                    ops,
                    i64(ti),
                    i64(OP_CACHE),
                    i64(o),
                    i64(_c32(i64((X[g, X_GMAX] + 1) * B0))),
                    i64(X[g, X_GCNT]),
                )
        elif k == K_QUERY:
            q = _c32(i64(arg[i]))
            RQ[r, Q_TOUCH] = _emit(st, code, ops, i64(ti), i64(OP_QUERY), i64(r), i64(q), i64(0))
            RQ[r, Q_MAXTOK] = max(RQ[r, Q_MAXTOK], q)
            if r != 0:
                _pend_resolve(st, RQ, PN, pay, i64(Q_PENDQ), i64(r), i64(q), i64(True))
        elif k == K_PREEMPT:
            # engines free the victim's blocks, then report the preemption: the replay must
            # know before the free, so the decision goes into the slot before that free when
            # nothing of the request came between
            slot = RQ[r, Q_LASTFREE]
            if slot >= 0 and RQ[r, Q_TOUCH] == slot + 1:
                code[slot] = OP_PREEMPT
                ops[slot, 1] = r
                ops[slot, 2] = 1
                st[S_NREAL] += 1
            RQ[r, Q_TOUCH] = _emit(st, code, ops, i64(ti), i64(OP_PREEMPT), i64(r), i64(0), i64(0))
            if r != 0:
                _pend_resolve(st, RQ, PN, pay, i64(Q_PENDT), i64(r), i64(0), i64(False))
                _pend_resolve(st, RQ, PN, pay, i64(Q_PENDQ), i64(r), i64(0), i64(False))
        elif k == K_FINISH:
            RQ[r, Q_TOUCH] = _emit(st, code, ops, i64(ti), i64(OP_FINISH), i64(r), i64(0), i64(0))
            if r != 0:
                _pend_resolve(st, RQ, PN, pay, i64(Q_PENDT), i64(r), i64(0), i64(False))
                _pend_resolve(st, RQ, PN, pay, i64(Q_PENDQ), i64(r), i64(0), i64(False))
        elif k == K_FAIL:
            RQ[r, Q_TOUCH] = _emit(st, code, ops, i64(ti), i64(OP_FAIL), i64(r), i64(_c32(i64(arg[i]))), i64(0))
            p = st[S_NPAY]
            pay[p] = -1
            pay[p + 1] = -1
            st[S_NPAY] = p + 2
            if r != 0:
                _pend_add(st, RQ, PN, i64(Q_PENDT), i64(r), i64(p))
                _pend_add(st, RQ, PN, i64(Q_PENDQ), i64(r), i64(p + 1))
        elif k == K_RESERVE:
            for x in range(lo, lo + cnt):
                BLK[ids[x], W_RESERVED] = 1
        elif k == K_EVICT:
            st[S_UNS_EVICT] += 1


@jit
def _uf_find(parent: np.ndarray, x: Int) -> Any:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@jit
def build_classes(UN: np.ndarray, nu: Int, nreq: Int) -> tuple[np.ndarray, np.ndarray]:
    """Content classes of (request, recorded block index): the recorded equalities closed over
    the shorter prefixes.  Each request's nodes are a prefix 0..L-1: CSR offsets and a dense
    class id per node."""
    L = np.zeros(nreq, np.int64)
    for u in range(nu):
        L[UN[u, 0]] = max(L[UN[u, 0]], UN[u, 2] + 1)
        L[UN[u, 1]] = max(L[UN[u, 1]], UN[u, 2] + 1)
    off = np.zeros(nreq + 1, np.int64)
    for r in range(nreq):
        off[r + 1] = off[r] + L[r]
    N = off[nreq]
    parent = np.arange(N)
    for u in range(nu):
        a0 = off[UN[u, 0]]
        b0 = off[UN[u, 1]]
        for j in range(UN[u, 2] + 1):
            x = _uf_find(parent, i64(a0 + j))
            y = _uf_find(parent, i64(b0 + j))
            if x != y:
                parent[x] = y
    cls = np.empty(N, np.int32)
    label = np.full(N, -1, np.int64)
    c = 0
    for x in range(N):
        root = _uf_find(parent, i64(x))
        if label[root] < 0:
            label[root] = c
            c += 1
        cls[x] = label[root]
    return off, cls


# == the replay ==========================================================================================
# All state of one replay lives in two flat arrays, M (int64) and N (int32), cut into regions
# whose offsets M holds: numba reference-counts every array argument of every call, and with
# a dozen arrays per call that counting took two thirds of the time.  Growable state (the
# requests' tables AR, the partial-free set FPK/FPV) is apart, passed where needed.
#
#   M: scalars [0, N_SCALARS); RQ (per request, N_RQ columns); KC (each block's content class);
#      CTK (the prefix cache's keys' class); MAXTOK (per request); CLSOFF (content classes' offsets)
#   N: BK (per block, N_BK columns); TRK (per block, when limited: the watermark's journal, N_TRK
#      columns); CTV (the prefix cache: key's block index j, block); AUX (the allocator's heaps or
#      runs); SCR (scratch: OUT, HITS, REL regions of S_SCRW each, and n more for the seeds'
#      compaction); FMAP (recorded id of a block taken without a request -> block); CLS (content
#      class per node); RES (reserved ids)
(
    S_B,
    S_B0,
    S_N,
    S_PREFIX,
    S_SEEDS,
    S_CONTIG,
    S_BUDDY,
    S_POLICY,
    S_ORDER,
    S_UF,
    S_TRACK,
    S_NREQ,
    S_CTN,
    S_NRES,
    S_NFMAX,
    O_RQ,
    O_KC,
    O_CTK,
    O_MAXTOK,
    O_CLSOFF,
    O_BK,
    O_CTV,
    O_AUX,
    O_SCR,
    O_FMAP,
    O_CLS,
    O_RES,
    O_TRK,
    S_SCRW,
    C_INUSE,
    C_WASTE,
    C_QUERY,
    C_HIT,
    C_FAILS,
    C_FRAG,
    C_PREEMPT,
    C_RECOMP,
    C_EVICT,
    C_MOVED,
    C_MAXRUN,
    C_UNSERVED,
    C_PEAK,
    C_PLATEAU,
    C_IAP_SET,
    C_IAP_W,
    C_IAP_S,
    C_HONOR,
    C_HONOR_FOR,
    C_RUN_HEAD,
    C_RUN_TAIL,
    C_RUN_COUNT,
    C_SUSP,
    C_AR_TOP,
    C_T_PREV,
    C_CUR_T,
    C_PREV_W,
    C_PREV_S,
    C_FP_COUNT,
    C_LIVE_CAP,
    A_FREE,
    A_HEAD,
    A_TAIL,
    A_HSIZE,
    A_NRUNS,
    A_RUNCAP,
    A_MAXO,
    A_DCOUNT,
    A_BHIN,
) = range(68)
A_BHOFF = 64 + 8  # per order: where its heap starts in AUX
A_BHSZ = A_BHOFF + 64  # per order: its heap's size
A_NFREE = A_BHSZ + 64  # per order: free chunks
N_SCALARS = A_NFREE + 64
F_BLOCKS, F_SLOTS, F_WASTE = range(3)
(
    R_TOFF,
    R_TLEN,
    R_TCAP,
    R_FILLED,
    R_KNOWN,
    R_WASTE,
    R_COV,
    R_SUSP,
    R_KEEP,
    R_DECIDED,
    R_PQV,
    R_PQH,
    R_AHV,
    R_AHH,
    R_ADV,
    R_ADH,
    R_MLO,
    R_MHI,
    R_RPREV,
    R_RNEXT,
    R_INRUN,
    R_FPGEN,
) = range(22)
N_RQ = 22
(B_REF, B_KJ, B_FM, B_X1, B_X2) = range(5)  # X1: nxt | in-heap flag | free chunk's order; X2: prv
N_BK = 5
(T_DIRTY, T_PMASK, T_DL) = range(3)  # changed since the last watermark; the free mask there; the journal (a list)
N_TRK = 3
P_FQ, P_FF, P_BF, P_BUDDY = 0, 1, 2, 3
O_FIFO, O_LIFO, O_LOWEST = 0, 1, 2


@jit
def _mark(M: np.ndarray, N: np.ndarray, b: Int, v: Int) -> None:
    """Set block b's free flag; while the watermark is tracked, journal the ids that changed
    since the last one (the watermark's mask is then kept without copying the pool at each
    new peak)."""
    if M[S_TRACK] != 0 and N[M[O_TRK] + b * N_TRK + T_DIRTY] == 0:
        N[M[O_TRK] + b * N_TRK + T_DIRTY] = 1
        N[M[O_TRK] + M[A_DCOUNT] * N_TRK + T_DL] = b
        M[A_DCOUNT] += 1
    N[M[O_BK] + b * N_BK + B_FM] = v


@jit
def _heap_push(N: np.ndarray, base: Int, size: Int, v: Int) -> Any:
    """Min-heap of int32 in N[base : base + size]; the new size."""
    i = size
    while i > 0:
        p = (i - 1) >> 1
        if N[base + p] <= v:
            break
        N[base + i] = N[base + p]
        i = p
    N[base + i] = v
    return size + 1


@jit
def _heap_pop(N: np.ndarray, base: Int, size: Int) -> tuple[np.int64, Any]:
    """(the smallest, the new size)."""
    top = N[base]
    size -= 1
    v = N[base + size]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= size:
            break
        if c + 1 < size and N[base + c + 1] < N[base + c]:
            c += 1
        if N[base + c] >= v:
            break
        N[base + i] = N[base + c]
        i = c
    if size > 0:
        N[base + i] = v
    return i64(top), size


# -- the allocators: kvprof/analysis/allocators.py's classes, on arrays ------------------------------------
# free queue: a doubly linked list in BK (X1 next, X2 previous; A_HEAD, A_TAIL), or for the
# lowest-id order a min-heap in AUX (X1: in the heap).  Run allocators: the free runs as a
# sorted array in AUX (starts at [0, RUNCAP), lengths at [RUNCAP, 2 RUNCAP)).  Buddy: X1 is
# the order of the free chunk starting at a block (-1 none); per order a min-heap of starts in
# AUX (lazy deletion; a flag per start, at A_BHIN, keeps a start once in its heap).
@jit
def _fq_link_tail(M: np.ndarray, N: np.ndarray, b: Int) -> None:
    bk = M[O_BK]
    t = M[A_TAIL]
    N[bk + b * N_BK + B_X2] = t
    N[bk + b * N_BK + B_X1] = -1
    if t >= 0:
        N[bk + t * N_BK + B_X1] = b
    else:
        M[A_HEAD] = b
    M[A_TAIL] = b


@jit
def _fq_unlink(M: np.ndarray, N: np.ndarray, b: Int) -> None:
    bk = M[O_BK]
    p = N[bk + b * N_BK + B_X2]
    q = N[bk + b * N_BK + B_X1]
    if p >= 0:
        N[bk + p * N_BK + B_X1] = q
    else:
        M[A_HEAD] = q
    if q >= 0:
        N[bk + q * N_BK + B_X2] = p
    else:
        M[A_TAIL] = p


@jit
def _ra_find(M: np.ndarray, N: np.ndarray, b: Int) -> Any:
    """Index of the last free run starting at or before b (-1: none)."""
    aux = M[O_AUX]
    lo = i64(0)
    hi = M[A_NRUNS]
    while lo < hi:
        mid = (lo + hi) >> 1
        if N[aux + mid] <= b:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@jit
def _ra_shift(M: np.ndarray, N: np.ndarray, i: Int, by: Int) -> None:
    """Open (by = 1) or close (by = -1) a gap at run index i."""
    aux = M[O_AUX]
    cap = M[A_RUNCAP]
    n = M[A_NRUNS]
    if by > 0:
        for x in range(n, i, -1):
            N[aux + x] = N[aux + x - 1]
            N[aux + cap + x] = N[aux + cap + x - 1]
    else:
        for x in range(i, n - 1):
            N[aux + x] = N[aux + x + 1]
            N[aux + cap + x] = N[aux + cap + x + 1]
    M[A_NRUNS] = n + by


@jit
def _bd_push(M: np.ndarray, N: np.ndarray, s: Int, o: Int) -> None:
    N[M[O_BK] + s * N_BK + B_X1] = o
    M[A_NFREE + o] += 1
    f = M[O_AUX] + M[A_BHIN] + M[A_BHOFF + o] + (s >> o)
    if N[f] == 0:
        N[f] = 1
        M[A_BHSZ + o] = _heap_push(N, i64(M[O_AUX] + M[A_BHOFF + o]), i64(M[A_BHSZ + o]), i64(s))


@jit
def _order_for(k: Int) -> Any:
    """max(0, (k - 1).bit_length()), as the Python allocator (1 for k = 0)."""
    if k <= 0:
        return i64(1) if k == 0 else i64(0)
    o = i64(0)
    while (i64(1) << o) < k:
        o += 1
    return o


@jit
def _al_take(M: np.ndarray, N: np.ndarray, b: Int) -> None:
    """Take one free block (a prefix-cache hit)."""
    policy = M[S_POLICY]
    bk = M[O_BK]
    if policy == P_FQ:
        if M[S_ORDER] != O_LOWEST:
            _fq_unlink(M, N, i64(b))
    elif policy == P_BUDDY:  # split the free chunk holding b around it
        for o in range(M[A_MAXO] + 1):
            s = b & ~((i64(1) << o) - 1)
            if N[bk + s * N_BK + B_X1] == o:
                N[bk + s * N_BK + B_X1] = -1
                M[A_NFREE + o] -= 1
                while o > 0:
                    o -= 1
                    half = i64(1) << o
                    if b < s + half:
                        _bd_push(M, N, i64(s + half), i64(o))
                    else:
                        _bd_push(M, N, i64(s), i64(o))
                        s += half
                break
    else:
        aux = M[O_AUX]
        cap = M[A_RUNCAP]
        i = _ra_find(M, N, i64(b))
        s = i64(N[aux + i])
        before = b - s
        after = s + N[aux + cap + i] - b - 1
        if before == 0 and after == 0:
            _ra_shift(M, N, i64(i), i64(-1))
        elif before == 0:
            N[aux + i] = b + 1
            N[aux + cap + i] = after
        elif after == 0:
            N[aux + cap + i] = before
        else:
            N[aux + cap + i] = before
            _ra_shift(M, N, i64(i + 1), i64(1))
            N[aux + i + 1] = b + 1
            N[aux + cap + i + 1] = after
    _mark(M, N, i64(b), i64(0))
    M[A_FREE] -= 1


@jit
def _al_alloc(M: np.ndarray, N: np.ndarray, k: Int) -> Any:
    """k blocks into SCR's OUT region (buddy: a whole chunk, maybe more); their count, or -1."""
    policy = M[S_POLICY]
    out = M[O_SCR]
    bk = M[O_BK]
    aux = M[O_AUX]
    track = M[S_TRACK] != 0
    if policy == P_FQ:
        if k > M[A_FREE]:
            return i64(-1)
        order = M[S_ORDER]
        if order == O_LOWEST:
            i = 0
            while i < k:
                b, M[A_HSIZE] = _heap_pop(N, i64(aux), i64(M[A_HSIZE]))
                N[bk + b * N_BK + B_X1] = 0
                if N[bk + b * N_BK + B_FM] == 1:
                    N[out + i] = b
                    _mark(M, N, i64(b), i64(0))
                    i += 1
        else:
            for i in range(k):
                b = M[A_HEAD] if order == O_FIFO else M[A_TAIL]
                # unlink the end (inline: the hottest loop of a replay)
                p = N[bk + b * N_BK + B_X2]
                q = N[bk + b * N_BK + B_X1]
                if p >= 0:
                    N[bk + p * N_BK + B_X1] = q
                else:
                    M[A_HEAD] = q
                if q >= 0:
                    N[bk + q * N_BK + B_X2] = p
                else:
                    M[A_TAIL] = p
                N[out + i] = b
                if track:
                    _mark(M, N, i64(b), i64(0))
                else:
                    N[bk + b * N_BK + B_FM] = 0
        M[A_FREE] -= k
        return k
    if policy == P_FF or policy == P_BF:
        if k > M[A_FREE]:
            return i64(-1)
        cap = M[A_RUNCAP]
        pick = -1
        for i in range(M[A_NRUNS]):
            ln = N[aux + cap + i]
            if ln >= k:
                if policy == P_FF:
                    pick = i
                    break
                if pick < 0 or ln < N[aux + cap + pick]:
                    pick = i
        if pick < 0:
            return i64(-1)
        st = i64(N[aux + pick])
        if N[aux + cap + pick] == k:
            _ra_shift(M, N, i64(pick), i64(-1))
        else:
            N[aux + pick] = st + k
            N[aux + cap + pick] -= k
        for x in range(k):
            N[out + x] = st + x
            _mark(M, N, i64(st + x), i64(0))
        M[A_FREE] -= k
        return k
    o = _order_for(i64(k))
    if o > M[A_MAXO]:
        return i64(-1)
    for j in range(o, M[A_MAXO] + 1):
        if M[A_NFREE + j] > 0:
            base = aux + M[A_BHOFF + j]
            st = i64(-1)
            while M[A_BHSZ + j] > 0:  # the lowest start still free at this order
                s, M[A_BHSZ + j] = _heap_pop(N, i64(base), i64(M[A_BHSZ + j]))
                N[aux + M[A_BHIN] + M[A_BHOFF + j] + (s >> j)] = 0
                if N[bk + s * N_BK + B_X1] == j:
                    N[bk + s * N_BK + B_X1] = -1
                    M[A_NFREE + j] -= 1
                    st = s
                    break
            while j > o:  # split, keeping the lower half
                j -= 1
                _bd_push(M, N, i64(st + (i64(1) << j)), i64(j))
            size = i64(1) << o
            for x in range(size):
                N[out + x] = st + x
                _mark(M, N, i64(st + x), i64(0))
            M[A_FREE] -= size
            return size
    return i64(-1)


@jit
def _al_free(M: np.ndarray, N: np.ndarray, base: Int, m: Int) -> None:
    """One free call: the blocks N[base : base + m] in the engine's order (their cached
    content, if any, is in BK)."""
    policy = M[S_POLICY]
    bk = M[O_BK]
    if policy == P_FQ:
        if M[S_UF] != 0:  # vLLM: cached ones to the tail in order, uncached ones to the head in order
            for i in range(m):
                b = N[base + i]
                if N[bk + b * N_BK + B_KJ] >= 0:
                    _fq_link_tail(M, N, i64(b))
                    _mark(M, N, i64(b), i64(1))
            for i in range(m - 1, -1, -1):
                b = N[base + i]
                if N[bk + b * N_BK + B_KJ] < 0:
                    h = M[A_HEAD]
                    N[bk + b * N_BK + B_X1] = h
                    N[bk + b * N_BK + B_X2] = -1
                    if h >= 0:
                        N[bk + h * N_BK + B_X2] = b
                    else:
                        M[A_TAIL] = b
                    M[A_HEAD] = b
                    _mark(M, N, i64(b), i64(1))
        elif M[S_ORDER] == O_LOWEST:
            for i in range(m):
                b = N[base + i]
                if N[bk + b * N_BK + B_X1] == 0:
                    N[bk + b * N_BK + B_X1] = 1
                    M[A_HSIZE] = _heap_push(N, i64(M[O_AUX]), i64(M[A_HSIZE]), i64(b))
                _mark(M, N, i64(b), i64(1))
        else:
            for i in range(m):
                _fq_link_tail(M, N, i64(N[base + i]))
                _mark(M, N, i64(N[base + i]), i64(1))
    elif policy == P_BUDDY:
        n = M[S_N]
        for i in range(m):
            b = i64(N[base + i])
            _mark(M, N, i64(b), i64(1))
            s = b
            o = i64(0)
            while o < M[A_MAXO]:  # merge with the buddy while it is wholly free
                bud = s ^ (i64(1) << o)
                if bud >= n or N[bk + bud * N_BK + B_X1] != o:
                    break
                N[bk + bud * N_BK + B_X1] = -1
                M[A_NFREE + o] -= 1
                s = min(s, bud)
                o += 1
            _bd_push(M, N, i64(s), i64(o))
    else:
        aux = M[O_AUX]
        cap = M[A_RUNCAP]
        for x in range(m):
            b = i64(N[base + x])
            i = _ra_find(M, N, i64(b))
            left = i >= 0 and N[aux + i] + N[aux + cap + i] == b
            right = i + 1 < M[A_NRUNS] and N[aux + i + 1] == b + 1
            if left and right:
                N[aux + cap + i] += 1 + N[aux + cap + i + 1]
                _ra_shift(M, N, i64(i + 1), i64(-1))
            elif left:
                N[aux + cap + i] += 1
            elif right:
                N[aux + i + 1] = b
                N[aux + cap + i + 1] += 1
            else:
                _ra_shift(M, N, i64(i + 1), i64(1))
                N[aux + i + 1] = b
                N[aux + cap + i + 1] = 1
            _mark(M, N, i64(b), i64(1))
    M[A_FREE] += m


@jit
def _al_can_alloc(M: np.ndarray, N: np.ndarray, k: Int) -> Any:
    policy = M[S_POLICY]
    if policy == P_FQ:
        return k <= M[A_FREE]
    if policy == P_BUDDY:
        for j in range(_order_for(i64(k)), M[A_MAXO] + 1):
            if M[A_NFREE + j] > 0:
                return True
        return False
    aux = M[O_AUX]
    cap = M[A_RUNCAP]
    longest = 0
    for i in range(M[A_NRUNS]):
        if N[aux + cap + i] > longest:
            longest = N[aux + cap + i]
    return k <= longest


@jit
def _al_reset(M: np.ndarray, N: np.ndarray, used: Int, nused: Int) -> None:
    """A fresh allocator (reserved ids out), then the blocks N[used : used + nused] (ascending)
    taken: the seeds' compaction rebuilds run allocators so.  Mask changes are journaled."""
    n = M[S_N]
    policy = M[S_POLICY]
    bk = M[O_BK]
    aux = M[O_AUX]
    isres = np.zeros(n, np.uint8)
    for x in range(M[S_NRES]):
        b = N[M[O_RES] + x]
        if 0 <= b < n:
            isres[b] = 1
    if policy == P_FQ:  # built once
        M[A_HEAD] = -1
        M[A_TAIL] = -1
        cnt = 0
        for b in range(n):
            if isres[b] == 0:
                cnt += 1
                if M[S_ORDER] == O_LOWEST:
                    N[aux + M[A_HSIZE]] = b  # ascending: a heap already
                    M[A_HSIZE] += 1
                    N[bk + b * N_BK + B_X1] = 1
                else:
                    _fq_link_tail(M, N, i64(b))
            _mark(M, N, i64(b), i64(1 - isres[b]))
        M[A_FREE] = cnt
    elif policy == P_FF or policy == P_BF:
        cap = M[A_RUNCAP]
        M[A_NRUNS] = 0
        b = 0
        cnt = 0
        while b < n:
            if isres[b]:
                b += 1
                continue
            e = b
            while e < n and isres[e] == 0:
                e += 1
            N[aux + M[A_NRUNS]] = b
            N[aux + cap + M[A_NRUNS]] = e - b
            M[A_NRUNS] += 1
            cnt += e - b
            b = e
        for b in range(n):
            if N[bk + b * N_BK + B_FM] != 1 - isres[b]:
                _mark(M, N, i64(b), i64(1 - isres[b]))
        M[A_FREE] = cnt
        for x in range(nused):
            _al_take(M, N, i64(N[used + x]))
    else:
        maxo = M[A_MAXO]
        for b in range(n):
            N[bk + b * N_BK + B_X1] = -1
        for o in range(maxo + 1):
            M[A_NFREE + o] = 0
            M[A_BHSZ + o] = 0
        for f in range(M[A_BHIN], M[A_BHIN] * 2):
            N[aux + f] = 0
        start = 0
        while start < n:  # maximal aligned chunks covering [0, n)
            o = maxo
            while o > 0 and (start % (1 << o) != 0 or start + (1 << o) > n):
                o -= 1
            _bd_push(M, N, i64(start), i64(o))
            start += 1 << o
        for b in range(n):
            if N[bk + b * N_BK + B_FM] != 1:
                _mark(M, N, i64(b), i64(1))
        M[A_FREE] = n
        for b in range(n):
            if isres[b]:
                _al_take(M, N, i64(b))
        for x in range(nused):
            _al_take(M, N, i64(N[used + x]))


# -- content keys, the prefix cache -------------------------------------------------------------------------
@jit
def _key(M: np.ndarray, N: np.ndarray, r: Int, j: Int) -> Any:
    """Block j of request r at this block size holds tokens up to (j+1)·B: its content is the
    class of r's recorded block holding token (j+1)·B - 1 (a class of its own beyond the
    recorded equalities); the cache key is that class with j."""
    m = ((j + 1) * M[S_B] + M[S_B0] - 1) // M[S_B0] - 1
    lo = M[M[O_CLSOFF] + r]
    if m < M[M[O_CLSOFF] + r + 1] - lo:
        return i64(N[M[O_CLS] + lo + m])
    return -1 - ((r << 32) | m)


@jit
def _ct_slot(M: np.ndarray, N: np.ndarray, kc: Int, kj: Int) -> Any:
    """The cache slot of (kc, kj), or -1 - the free slot where it would go."""
    mask = M[S_CTN] - 1
    ctk = M[O_CTK]
    ctv = M[O_CTV]
    h = _mix(i64(kc ^ (kj * i64(0x2545F4914F6CDD1D)))) & mask
    while True:
        if N[ctv + 2 * h] == EMPTY:
            return -1 - h
        if M[ctk + h] == kc and N[ctv + 2 * h] == kj:
            return h
        h = (h + 1) & mask


@jit
def _ct_delete(M: np.ndarray, N: np.ndarray, i: Int) -> None:
    mask = M[S_CTN] - 1
    ctk = M[O_CTK]
    ctv = M[O_CTV]
    j = i
    while True:
        j = (j + 1) & mask
        if N[ctv + 2 * j] == EMPTY:
            break
        h = _mix(i64(M[ctk + j] ^ (i64(N[ctv + 2 * j]) * i64(0x2545F4914F6CDD1D)))) & mask
        if (i <= j and i < h <= j) or (i > j and (h > i or h <= j)):
            continue
        M[ctk + i] = M[ctk + j]
        N[ctv + 2 * i] = N[ctv + 2 * j]
        N[ctv + 2 * i + 1] = N[ctv + 2 * j + 1]
        i = j
    N[ctv + 2 * i] = EMPTY


# -- blocks ---------------------------------------------------------------------------------------------------
@jit
def _snapshot(M: np.ndarray, N: np.ndarray) -> None:
    """A new watermark: its mask is the free mask now."""
    trk = M[O_TRK]
    for i in range(M[A_DCOUNT]):
        b = N[trk + i * N_TRK + T_DL]
        N[trk + b * N_TRK + T_PMASK] = N[M[O_BK] + b * N_BK + B_FM]
        N[trk + b * N_TRK + T_DIRTY] = 0
    M[A_DCOUNT] = 0


@jit
def _release(M: np.ndarray, N: np.ndarray, base: Int, m: Int) -> None:
    """One free call: the blocks N[base : base + m], in the order the engine frees them."""
    bk = M[O_BK]
    rel = M[O_SCR] + 2 * M[S_SCRW]
    c = 0
    for i in range(m):
        b = N[base + i]
        N[bk + b * N_BK + B_REF] -= 1
        if N[bk + b * N_BK + B_REF] == 0:
            N[rel + c] = b
            c += 1
    if c > 0:
        M[C_INUSE] -= c
        _al_free(M, N, i64(rel), i64(c))
        if M[C_PLATEAU] != 0:  # the watermark's plateau ends: its internal fragmentation, by analyze's rule
            M[C_IAP_SET] = 1  # (the state before the decrease's instant)
            M[C_IAP_W] = M[C_PREV_W]
            M[C_IAP_S] = M[C_PREV_S]
            M[C_PLATEAU] = 0


@jit
def _new_blocks(M: np.ndarray, N: np.ndarray, k: Int) -> Any:
    """k new blocks (SCR's OUT region); their count, -1 when the allocator refuses."""
    got = _al_alloc(M, N, i64(k))
    if got < 0:
        return i64(-1)
    bk = M[O_BK]
    out = M[O_SCR]
    for i in range(got):
        b = N[out + i]
        kj = N[bk + b * N_BK + B_KJ]
        if kj >= 0:  # a free block leaves the free pool for a new use: its cached content goes
            s = _ct_slot(M, N, i64(M[M[O_KC] + b]), i64(kj))
            if s >= 0 and N[M[O_CTV] + 2 * s + 1] == b:
                _ct_delete(M, N, i64(s))
            N[bk + b * N_BK + B_KJ] = -1
            M[C_EVICT] += 1
        N[bk + b * N_BK + B_REF] = 1
    M[C_INUSE] += got
    if M[C_INUSE] > M[C_PEAK]:
        M[C_PEAK] = M[C_INUSE]
        if M[S_TRACK] != 0:
            _snapshot(M, N)
        M[C_PLATEAU] = 1
    return got


# -- requests --------------------------------------------------------------------------------------------------
@jit
def _lookup(M: np.ndarray, N: np.ndarray, r: Int, limit_tokens: Int, dry: Int) -> Any:
    """Cached blocks of r's prefix into SCR's HITS region (their count); unless dry, r holds them."""
    if M[S_PREFIX] == 0:
        return i64(0)
    hits = M[O_SCR] + M[S_SCRW]
    nh = i64(0)
    for j in range(max(limit_tokens, 0) // M[S_B]):
        s = _ct_slot(M, N, i64(_key(M, N, i64(r), i64(j))), i64(j))
        if s < 0:
            break
        N[hits + nh] = N[M[O_CTV] + 2 * s + 1]
        nh += 1
    if dry:
        return nh
    bk = M[O_BK]
    for i in range(nh):
        b = N[hits + i]
        if N[bk + b * N_BK + B_REF] == 0:
            _al_take(M, N, i64(b))
            N[bk + b * N_BK + B_REF] = 1
            M[C_INUSE] += 1
        else:
            N[bk + b * N_BK + B_REF] += 1
    if nh > 0 and M[C_INUSE] > M[C_PEAK]:
        M[C_PEAK] = M[C_INUSE]
        if M[S_TRACK] != 0:
            _snapshot(M, N)
        M[C_PLATEAU] = 1
    return nh


@jit
def _limit(M: np.ndarray, r: Int, qhint: Int) -> Any:
    """Tokens an admission may find cached: all but the last it brings (vLLM's and the demo's rule)."""
    rq = M[O_RQ] + r * N_RQ
    if M[rq + R_PQH] != 0:
        return M[rq + R_PQV] - 1
    if qhint >= 0:
        return qhint - 1
    return M[rq + R_KNOWN] - 1


@jit
def _table_cap(M: np.ndarray, r: Int) -> Any:
    t = -(-max(M[M[O_MAXTOK] + r], 0) // M[S_B])
    cap = 2 * t + 2 if M[S_BUDDY] != 0 else t + 2  # buddy: a chunk is less than twice what was asked
    return min(cap, M[S_N] + 2)  # a table's blocks are distinct


@jit
def _admit(M: np.ndarray, N: np.ndarray, AR: np.ndarray, r: Int, rec_hit_tokens: Int, qhint: Int) -> None:
    """First lookup of an admission: prefix hits become the start of the table (the caller
    made room for it: _ensure_room).  The admission is in progress until its allocation
    succeeds (_admitted) or fails."""
    rq = M[O_RQ] + r * N_RQ
    nh = _lookup(M, N, i64(r), i64(max(_limit(M, i64(r), i64(qhint)), rec_hit_tokens)), i64(0))
    # blocks the engine found cached and this replay did not: it computes them, and caches them
    M[rq + R_MLO] = nh
    M[rq + R_MHI] = rec_hit_tokens // M[S_B0]
    if M[rq + R_TLEN] >= 0:
        M[C_LIVE_CAP] -= M[rq + R_TCAP]
    cap = _table_cap(M, i64(r))
    top = M[C_AR_TOP]
    M[rq + R_TOFF] = top
    M[rq + R_TCAP] = cap
    M[C_AR_TOP] = top + cap
    M[C_LIVE_CAP] += cap
    hits = M[O_SCR] + M[S_SCRW]
    for i in range(nh):
        AR[top + i] = N[hits + i]
    M[rq + R_TLEN] = nh
    M[rq + R_FPGEN] += 1
    if M[rq + R_INRUN] == 0:  # running, in admission order
        M[rq + R_INRUN] = 1
        t = M[C_RUN_TAIL]
        M[rq + R_RPREV] = t
        M[rq + R_RNEXT] = -1
        if t >= 0:
            M[M[O_RQ] + t * N_RQ + R_RNEXT] = r
        else:
            M[C_RUN_HEAD] = r
        M[C_RUN_TAIL] = r
        M[C_RUN_COUNT] += 1
    M[rq + R_ADH] = 1
    M[rq + R_ADV] = nh * M[S_B]


@jit
def _admitted(M: np.ndarray, r: Int) -> None:
    """The admission succeeded: its query counts now, or when the engine reports it."""
    rq = M[O_RQ] + r * N_RQ
    if M[rq + R_ADH] == 0:
        return
    M[rq + R_ADH] = 0
    M[C_MAXRUN] = max(M[C_MAXRUN], M[C_RUN_COUNT])
    if M[rq + R_PQH] != 0:
        M[rq + R_PQH] = 0
        M[C_QUERY] += M[rq + R_PQV]
        M[C_HIT] += M[rq + R_ADV]
    else:
        M[rq + R_AHH] = 1
        M[rq + R_AHV] = M[rq + R_ADV]


@jit
def _run_pop(M: np.ndarray, r: Int) -> None:
    rq = M[O_RQ] + r * N_RQ
    if M[rq + R_INRUN] == 0:
        return
    M[rq + R_INRUN] = 0
    p = M[rq + R_RPREV]
    q = M[rq + R_RNEXT]
    if p >= 0:
        M[M[O_RQ] + p * N_RQ + R_RNEXT] = q
    else:
        M[C_RUN_HEAD] = q
    if q >= 0:
        M[M[O_RQ] + q * N_RQ + R_RPREV] = p
    else:
        M[C_RUN_TAIL] = p
    M[C_RUN_COUNT] -= 1


@jit
def _free_table(M: np.ndarray, N: np.ndarray, AR: np.ndarray, r: Int) -> None:
    """Release r's table (tail first, as vLLM and the demo free) and drop it."""
    rq = M[O_RQ] + r * N_RQ
    m = M[rq + R_TLEN]
    if m >= 0:
        off = M[rq + R_TOFF]
        out = M[O_SCR]
        c = 0
        for i in range(m - 1, -1, -1):
            b = AR[off + i]
            if b >= 0:
                N[out + c] = b
                c += 1
        M[C_LIVE_CAP] -= M[rq + R_TCAP]
        M[rq + R_TLEN] = -1
        _release(M, N, i64(out), i64(c))
    _run_pop(M, i64(r))


@jit
def _defragment(M: np.ndarray, N: np.ndarray, AR: np.ndarray, need: Int) -> Any:
    """The seeds' recovery for run allocators: cached content is already free to take, so
    compact: move every in-use block down into one run; true if a run of ``need`` results."""
    n = M[S_N]
    bk = M[O_BK]
    isres = np.zeros(n, np.uint8)
    for x in range(M[S_NRES]):
        b = N[M[O_RES] + x]
        if 0 <= b < n:
            isres[b] = 1
    new_of = np.full(n, -1, np.int64)
    dest = np.zeros(n, np.uint8)
    slot = 0
    moved = 0
    inuse = 0
    for b in range(n):
        if N[bk + b * N_BK + B_REF] > 0:
            while isres[slot]:
                slot += 1
            new_of[b] = slot
            dest[slot] = 1
            if slot != b:
                moved += 1
            slot += 1
            inuse += 1
    if moved == 0:
        return False
    M[C_MOVED] += moved
    for r in range(M[S_NREQ]):
        rq = M[O_RQ] + r * N_RQ
        m = M[rq + R_TLEN]
        if m > 0:
            off = M[rq + R_TOFF]
            for i in range(m):
                b = AR[off + i]
                if b >= 0:
                    AR[off + i] = new_of[b]
    fm = M[O_FMAP]
    for rec in range(M[S_NFMAX]):
        if N[fm + rec] >= 0:
            N[fm + rec] = new_of[N[fm + rec]]
    # moved blocks keep their content; a free cached block that a moved block lands on loses it
    kc = np.zeros(n, np.int64)
    kj = np.full(n, -1, np.int32)
    okc = M[O_KC]
    for b in range(n):
        j = N[bk + b * N_BK + B_KJ]
        if j < 0:
            continue
        if new_of[b] >= 0:
            kc[new_of[b]] = M[okc + b]
            kj[new_of[b]] = j
        elif dest[b]:
            M[C_EVICT] += 1
        else:
            kc[b] = M[okc + b]
            kj[b] = j
    ctv = M[O_CTV]
    for s in range(M[S_CTN]):
        N[ctv + 2 * s] = EMPTY
    for b in range(n):
        M[okc + b] = kc[b]
        N[bk + b * N_BK + B_KJ] = kj[b]
        if kj[b] >= 0:
            s = -1 - _ct_slot(M, N, i64(kc[b]), i64(kj[b]))
            M[M[O_CTK] + s] = kc[b]
            N[ctv + 2 * s] = kj[b]
            N[ctv + 2 * s + 1] = b
    ref = np.zeros(n, np.int32)
    for b in range(n):
        if new_of[b] >= 0:
            ref[new_of[b]] = N[bk + b * N_BK + B_REF]
    used = M[O_SCR] + 3 * M[S_SCRW]  # the blocks in use now, ascending, in the scratch's last region
    u = 0
    for b in range(n):
        N[bk + b * N_BK + B_REF] = ref[b]
        if ref[b] > 0:
            N[used + u] = b
            u += 1
    _al_reset(M, N, i64(used), i64(u))
    return _al_can_alloc(M, N, i64(need))


@jit
def _grow(M: np.ndarray, N: np.ndarray, AR: np.ndarray, r: Int, tokens: Int, admitting: Int) -> bool:
    """Grow r's table to hold ``tokens``; on a shortage, recover; False if r must wait."""
    rq = M[O_RQ] + r * N_RQ
    need = -(-tokens // M[S_B]) - M[rq + R_TLEN]
    while need > 0:
        got = _new_blocks(M, N, i64(need))
        if got >= 0:
            off = M[rq + R_TOFF] + M[rq + R_TLEN]
            out = M[O_SCR]
            for i in range(got):
                AR[off + i] = N[out + i]
            M[rq + R_TLEN] += got
            return True
        M[C_FAILS] += 1
        if M[A_FREE] >= need:
            M[C_FRAG] += 1
            if M[S_SEEDS] != 0 and M[S_CONTIG] != 0 and _defragment(M, N, AR, i64(need)):
                continue
        if admitting:  # a new admission waits; it does not preempt running requests
            return False
        v = M[C_RUN_TAIL]  # preempt the newest running request (recompute)
        if v < 0:
            return False
        vq = M[O_RQ] + v * N_RQ
        M[C_PREEMPT] += 1
        M[C_RECOMP] += M[vq + R_FILLED]
        _free_table(M, N, AR, i64(v))
        if M[vq + R_SUSP] == 0:
            M[vq + R_SUSP] = 1
            M[C_SUSP] += 1
        M[C_WASTE] -= M[vq + R_WASTE]
        M[vq + R_WASTE] = 0
        if v == r:
            return False
    return True


@jit
def _resume(M: np.ndarray, N: np.ndarray, AR: np.ndarray, r: Int, tokens: Int, qhint: Int) -> bool:
    """A waiting or preempted request tries again (the caller made room: _ensure_room)."""
    rq = M[O_RQ] + r * N_RQ
    _admit(M, N, AR, i64(r), i64(0), i64(qhint))
    if _grow(M, N, AR, i64(r), i64(tokens), i64(1)):
        if M[rq + R_SUSP] != 0:
            M[rq + R_SUSP] = 0
            M[C_SUSP] -= 1
        _admitted(M, i64(r))
        return True
    M[rq + R_ADH] = 0  # the admission failed: the hits go back; it waits, its query still to count
    _free_table(M, N, AR, i64(r))
    return False


@jit
def _need(M: np.ndarray, N: np.ndarray, r: Int, tokens: Int, qhint: Int) -> Any:
    """Blocks r's allocation for ``tokens`` takes from the free pool."""
    if tokens < 0:
        return i64(1)
    B = M[S_B]
    tl = M[M[O_RQ] + r * N_RQ + R_TLEN]
    if tl > 0:
        return max(-(-tokens // B) - tl, 0)
    nh = _lookup(M, N, i64(r), i64(_limit(M, i64(r), i64(qhint))), i64(1))
    hits = M[O_SCR] + M[S_SCRW]
    c = 0
    for i in range(nh):
        if N[M[O_BK] + N[hits + i] * N_BK + B_REF] == 0:
            c += 1
    return max(-(-tokens // B) - nh, 0) + c


@jit
def _ensure_room(M: np.ndarray, AR: np.ndarray, r: Int) -> tuple[bool, np.ndarray]:
    """Room at the arena's top for a new table of r: the live tables are compacted into a new
    arena when short.  Returns (whether it moved, the arena)."""
    cap = _table_cap(M, i64(r))
    if M[C_AR_TOP] + cap <= len(AR):
        return False, AR
    size = max(2 * (M[C_LIVE_CAP] + cap), 1024)
    ar = np.empty(size, np.int32)
    top = 0
    for q in range(M[S_NREQ]):
        rq = M[O_RQ] + q * N_RQ
        m = M[rq + R_TLEN]
        if m >= 0:
            off = M[rq + R_TOFF]
            for i in range(m):
                ar[top + i] = AR[off + i]
            M[rq + R_TOFF] = top
            top += M[rq + R_TCAP]
    M[C_AR_TOP] = top
    return True, ar


@jit
def _fp_room(M: np.ndarray, FPK: np.ndarray, FPV: np.ndarray, extra: Int) -> tuple[bool, np.ndarray, np.ndarray]:
    """The set of freed positions (partial frees), with room for ``extra`` more: rehashed,
    live entries only (this admission's), when over half full."""
    if 2 * (M[C_FP_COUNT] + extra) <= len(FPK):
        return False, FPK, FPV
    live = 0
    for s in range(len(FPK)):
        k = FPK[s]
        if k != EMPTY and FPV[s] == M[M[O_RQ] + (k >> 32) * N_RQ + R_FPGEN]:
            live += 1
    size = 16
    while size < 4 * (live + extra):
        size *= 2
    nk = np.full(size, EMPTY, np.int64)
    nv = np.zeros(size, np.int64)
    for s in range(len(FPK)):
        k = FPK[s]
        if k != EMPTY and FPV[s] == M[M[O_RQ] + (k >> 32) * N_RQ + R_FPGEN]:
            t = -1 - hm_find(nk, i64(k))
            nk[t] = k
            nv[t] = FPV[s]
    M[C_FP_COUNT] = live
    return True, nk, nv


@jit
def layout(
    n: Int, nreq: Int, ncls: Int, nclsoff: Int, nfmax: Int, nres: Int, policy: Int, order: Int, scrw: Int, limited: Int
) -> tuple[Any, Any, np.ndarray]:
    """Offsets of the regions of M and N: (M size, N size, offsets array).  ``scrw``: the
    most blocks one call moves (the largest table, the largest allocation without a request)."""
    ctn = 16
    while ctn < 2 * n:
        ctn *= 2
    maxo = 0
    while (2 << maxo) <= n:
        maxo += 1
    if policy == P_FQ:
        aux = n if order == O_LOWEST else 1
    elif policy == P_BUDDY:
        aux = 0
        for o in range(maxo + 1):
            aux += (n >> o) + 1
        aux *= 2
    else:
        aux = 2 * (n // 2 + 2)
    off = np.zeros(16, np.int64)
    m = N_SCALARS
    off[0] = m  # RQ
    m += nreq * N_RQ
    off[1] = m  # KC
    m += n
    off[2] = m  # CTK
    m += ctn
    off[3] = m  # MAXTOK
    m += nreq
    off[4] = m  # CLSOFF
    m += nclsoff
    k = 0
    off[5] = k  # BK
    k += n * N_BK
    off[6] = k  # CTV
    k += 2 * ctn
    off[7] = k  # AUX
    k += aux
    off[8] = k  # SCR
    k += 3 * scrw + (n if policy != P_FQ else 0)
    off[9] = k  # FMAP
    k += max(nfmax, 1)
    off[10] = k  # CLS
    k += ncls
    off[11] = k  # RES
    k += max(nres, 1)
    off[14] = k  # TRK
    k += n * N_TRK if limited else 0
    off[12] = ctn
    off[13] = maxo
    return m, k, off


@jit
def replay(
    code: np.ndarray,
    ops: np.ndarray,
    pay: np.ndarray,
    cls_off: np.ndarray,
    cls: np.ndarray,
    maxtok: np.ndarray,
    B0: Int,
    t_start: Int,
    t_end: Int,
    nfmax: Int,
    nfalloc: Int,
    B: Int,
    n: Int,
    policy: Int,
    order: Int,
    uncached_first: Int,
    seeds: Int,
    prefix: Int,
    limited: Int,
    reserved: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One configuration's replay.  Returns (M, N, the float integrals): the counters are M's
    scalars; when ``limited``, N's TRK columns hold the free mask at the watermark (T_PMASK).
    ``nfalloc``: the most blocks one allocation without a request takes."""
    nreq = len(maxtok)
    scrw = max(nfalloc, 1)
    for r in range(nreq):  # the largest table: a bound on the blocks one call moves
        t = -(-max(maxtok[r], 0) // B)
        scrw = max(scrw, min(2 * t + 2 if policy == P_BUDDY else t + 2, n + 2))
    msize, nsize, off = layout(
        i64(n),
        i64(nreq),
        i64(len(cls)),
        i64(len(cls_off)),
        i64(nfmax),
        i64(len(reserved)),
        i64(policy),
        i64(order),
        i64(scrw),
        i64(limited),
    )
    M_owner = np.zeros(msize, np.int64)
    N_owner = np.zeros(nsize, np.int32)
    M = _borrow(M_owner)
    N = _borrow(N_owner)
    F = np.zeros(4, np.float64)
    M[O_RQ], M[O_KC], M[O_CTK], M[O_MAXTOK], M[O_CLSOFF] = off[0], off[1], off[2], off[3], off[4]
    M[O_BK], M[O_CTV], M[O_AUX], M[O_SCR], M[O_FMAP], M[O_CLS], M[O_RES] = (
        off[5],
        off[6],
        off[7],
        off[8],
        off[9],
        off[10],
        off[11],
    )
    M[O_TRK] = off[14]
    M[S_SCRW] = scrw
    M[S_CTN] = off[12]
    M[A_MAXO] = off[13]
    M[S_B] = B
    M[S_B0] = B0
    M[S_N] = n
    M[S_PREFIX] = 1 if prefix else 0
    M[S_SEEDS] = 1 if seeds else 0
    M[S_CONTIG] = 1 if policy != P_FQ else 0
    M[S_BUDDY] = 1 if policy == P_BUDDY else 0
    M[S_POLICY] = policy
    M[S_ORDER] = order
    M[S_UF] = 1 if uncached_first else 0
    M[S_NREQ] = nreq
    M[S_NRES] = len(reserved)
    M[S_NFMAX] = max(nfmax, 1)
    for r in range(nreq):
        M[M[O_MAXTOK] + r] = maxtok[r]
        rq = M[O_RQ] + r * N_RQ
        M[rq + R_TLEN] = -1
        M[rq + R_DECIDED] = -1
        M[rq + R_RPREV] = -1
        M[rq + R_RNEXT] = -1
    for x in range(len(cls_off)):
        M[M[O_CLSOFF] + x] = cls_off[x]
    for x in range(len(cls)):
        N[M[O_CLS] + x] = cls[x]
    for x in range(len(reserved)):
        N[M[O_RES] + x] = reserved[x]
    for x in range(M[S_NFMAX]):
        N[M[O_FMAP] + x] = -1
    for s in range(M[S_CTN]):
        N[M[O_CTV] + 2 * s] = EMPTY
    bk = M[O_BK]
    for b in range(n):
        N[bk + b * N_BK + B_KJ] = -1
        N[bk + b * N_BK + B_X1] = -1
        N[bk + b * N_BK + B_X2] = -1
    M[A_RUNCAP] = n // 2 + 2
    if policy == P_BUDDY:
        total = 0
        for o in range(M[A_MAXO] + 1):
            M[A_BHOFF + o] = total
            total += (n >> o) + 1
        M[A_BHIN] = total
    M[A_HEAD] = -1
    M[A_TAIL] = -1
    _al_reset(M, N, i64(0), i64(0))
    if limited:
        for b in range(n):
            N[M[O_TRK] + b * N_TRK + T_PMASK] = N[bk + b * N_BK + B_FM]
        M[S_TRACK] = 1
    AR_owner = np.empty(4096, np.int32)
    AR = _borrow(AR_owner)
    FPK = np.full(16, EMPTY, np.int64)
    FPV = np.zeros(16, np.int64)
    M[C_PEAK] = -1
    M[C_HONOR_FOR] = -1
    M[C_RUN_HEAD] = -1
    M[C_RUN_TAIL] = -1
    M[C_T_PREV] = t_start
    M[C_CUR_T] = t_start
    orq = M[O_RQ]
    t = t_start
    pc = 0
    for i in range(len(code)):
        c = code[i]
        if c == OP_NOP:
            continue
        if c == OP_TIME:
            t += (i64(ops[i, 2]) << 32) + (i64(ops[i, 0]) & U32_MASK)
            continue
        t += i64(ops[i, 0]) & U32_MASK
        if t != M[C_CUR_T]:
            d = t - M[C_T_PREV]
            if d > 0:
                slots = M[C_INUSE] * B
                F[F_BLOCKS] += float(M[C_INUSE]) * float(d)
                F[F_SLOTS] += float(slots) * float(d)
                F[F_WASTE] += float(min(M[C_WASTE], slots)) * float(d)
            M[C_T_PREV] = t
            M[C_PREV_W] = M[C_WASTE]
            M[C_PREV_S] = M[C_INUSE] * B
            M[C_CUR_T] = t
        r = i64(ops[i, 1])
        rq = orq + r * N_RQ
        if c == OP_STATE:
            f = i64(ops[i, 2])
            M[rq + R_FILLED] = f
            if f > M[rq + R_KNOWN]:
                M[rq + R_KNOWN] = f
            if M[rq + R_SUSP] != 0:
                moved, ar = _ensure_room(M, AR, i64(r))
                if moved:
                    AR_owner = ar
                    AR = _borrow(AR_owner)
                if not _resume(M, N, AR, i64(r), i64(ops[i, 3]), i64(-1)):
                    continue
            m = M[rq + R_TLEN]
            v = max(m * B - f, 0) if m > 0 else 0
            M[C_WASTE] += v - M[rq + R_WASTE]
            M[rq + R_WASTE] = v
        elif c == OP_GROW:
            nbl = i64(ops[i, 2])
            target = i64(pay[pc])
            qhint = i64(pay[pc + 1])
            pc += 2
            tokens = target if target >= 0 else nbl * B0
            if B == B0:  # at the recorded size: the length the engine grew it to (lookahead, chunking)
                tokens = nbl * B
            if M[rq + R_SUSP] != 0 or M[rq + R_TLEN] < 0:
                moved, ar = _ensure_room(M, AR, i64(r))
                if moved:
                    AR_owner = ar
                    AR = _borrow(AR_owner)
            if M[rq + R_SUSP] != 0:
                _resume(M, N, AR, i64(r), i64(tokens), i64(qhint))
                continue
            M[rq + R_KEEP] = 0
            if M[rq + R_TLEN] < 0:
                _admit(M, N, AR, i64(r), i64(0), i64(qhint))
            admitting = M[rq + R_ADH] != 0
            if _grow(M, N, AR, i64(r), i64(tokens), i64(admitting)):
                if admitting:
                    _admitted(M, i64(r))
            elif admitting:
                M[rq + R_ADH] = 0
                _free_table(M, N, AR, i64(r))
                if M[rq + R_SUSP] == 0:
                    M[rq + R_SUSP] = 1
                    M[C_SUSP] += 1
            if M[C_HONOR_FOR] == r:
                M[C_HONOR] = 0
        elif c == OP_LOOKUP:
            qhint = i64(pay[pc])
            pc += 1
            if M[rq + R_SUSP] != 0 or M[rq + R_TLEN] >= 0:
                continue
            moved, ar = _ensure_room(M, AR, i64(r))
            if moved:
                AR_owner = ar
                AR = _borrow(AR_owner)
            _admit(M, N, AR, i64(r), i64(ops[i, 2]), i64(qhint))
        elif c == OP_CACHE:
            cnt = i64(ops[i, 3])
            p0 = pc
            pc += cnt
            cv = i64(ops[i, 2])
            if cv > M[rq + R_COV]:
                M[rq + R_COV] = cv
            m = M[rq + R_TLEN]
            if m > 0 and prefix:
                off0 = M[rq + R_TOFF]
                # at the recorded size: the blocks the engine cached, then those the engine had
                # found cached where the replay computed them; at others, every full block
                if B == B0:
                    nrec = cnt
                    lo = M[rq + R_MLO]
                    total = nrec + max(min(M[rq + R_MHI], M[rq + R_COV] // B, m) - lo, 0)
                else:
                    nrec = 0
                    lo = 0
                    total = min(M[rq + R_COV] // B, m)
                for x in range(total):
                    j = i64(pay[p0 + x]) if x < nrec else lo + (x - nrec)
                    if j >= m:
                        continue
                    b = AR[off0 + j]
                    if b < 0 or N[bk + b * N_BK + B_KJ] >= 0:
                        continue
                    kc = _key(M, N, i64(r), i64(j))
                    s = _ct_slot(M, N, i64(kc), i64(j))
                    if s < 0:
                        s = -1 - s
                        M[M[O_CTK] + s] = kc
                        N[M[O_CTV] + 2 * s] = j
                        N[M[O_CTV] + 2 * s + 1] = b
                        M[M[O_KC] + b] = kc
                        N[bk + b * N_BK + B_KJ] = j
        elif c == OP_FREE:
            cnt = i64(ops[i, 3])
            p0 = pc
            pc += cnt
            if M[rq + R_KEEP] != 0 or M[rq + R_SUSP] != 0 or M[rq + R_TLEN] < 0:
                continue
            if ops[i, 2] != 0:
                _free_table(M, N, AR, i64(r))
                continue
            moved, fk, fv = _fp_room(M, FPK, FPV, i64(cnt))
            if moved:
                FPK = fk
                FPV = fv
            g = M[rq + R_FPGEN]
            for x in range(cnt):
                key = (r << 32) | i64(pay[p0 + x])
                s = hm_find(FPK, i64(key))
                if s < 0:
                    s = -1 - s
                    FPK[s] = key
                    M[C_FP_COUNT] += 1
                FPV[s] = g
            off0 = M[rq + R_TOFF]
            m = M[rq + R_TLEN]
            out = M[O_SCR]
            ng = 0
            for j in range(m - 1, -1, -1):  # blocks all of whose tokens were freed
                b = AR[off0 + j]
                if b < 0:
                    continue
                allf = True
                for p in range(j * B // B0, ((j + 1) * B - 1) // B0 + 1):
                    s = hm_find(FPK, i64((r << 32) | p))
                    if s < 0 or FPV[s] != g:
                        allf = False
                        break
                if allf:
                    AR[off0 + j] = -1
                    N[out + ng] = b
                    ng += 1
            _release(M, N, i64(out), i64(ng))
        elif c == OP_QUERY:
            q = i64(ops[i, 2])
            if M[rq + R_AHH] != 0:  # the lookup came first: count it now
                M[rq + R_AHH] = 0
                M[C_QUERY] += q
                M[C_HIT] += M[rq + R_AHV]
            else:
                M[rq + R_PQH] = 1
                M[rq + R_PQV] = q
        elif c == OP_PREEMPT:
            decision = ops[i, 2] != 0
            if decision or M[rq + R_DECIDED] < 0:
                if M[rq + R_SUSP] != 0:
                    continue
                if M[C_HONOR] != 0:  # the engine was short, and so is the replay
                    M[C_PREEMPT] += 1
                    M[C_RECOMP] += M[rq + R_FILLED]
                    M[rq + R_DECIDED] = 1
                else:  # the replay has room: the victim keeps its blocks
                    M[rq + R_KEEP] = 1
                    M[rq + R_DECIDED] = 0
            if not decision:
                was = M[rq + R_DECIDED]
                M[rq + R_DECIDED] = -1
                if was == 1:
                    M[C_WASTE] -= M[rq + R_WASTE]
                    M[rq + R_WASTE] = 0
        elif c == OP_FINISH:
            M[C_WASTE] -= M[rq + R_WASTE]
            M[rq + R_WASTE] = 0
            _run_pop(M, i64(r))  # blocks it never freed stay in use (a leak)
            if M[rq + R_SUSP] != 0:
                M[C_UNSERVED] += 1
                M[rq + R_SUSP] = 0
                M[C_SUSP] -= 1
            M[rq + R_KEEP] = 0
        elif c == OP_FAIL:
            tokens = i64(pay[pc])
            qhint = i64(pay[pc + 1])
            pc += 2
            wanted = i64(ops[i, 2])
            if tokens < 0 and wanted > 0:  # no later state says how long: the blocks the engine wanted
                tokens = max(M[rq + R_TLEN], 0) * B + wanted * B0
            need = _need(M, N, i64(r), i64(tokens), i64(qhint))
            honor = need > 0 and not _al_can_alloc(M, N, i64(need))
            M[C_HONOR] = 1 if honor else 0
            M[C_HONOR_FOR] = r
            if honor:
                M[C_FAILS] += 1
                if M[A_FREE] >= need:
                    M[C_FRAG] += 1
        elif c == OP_STEP:
            M[C_HONOR] = 0
        elif c == OP_FALLOC:
            cnt = i64(ops[i, 3])
            p0 = pc
            pc += cnt
            got = _new_blocks(M, N, i64(cnt))
            if got < 0:
                M[C_FAILS] += 1
                continue
            for x in range(min(cnt, got)):
                N[M[O_FMAP] + pay[p0 + x]] = N[M[O_SCR] + x]
        elif c == OP_FFREE:
            cnt = i64(ops[i, 3])
            p0 = pc
            pc += cnt
            for x in range(cnt):
                fx = M[O_FMAP] + pay[p0 + x]
                b = N[fx]
                if b >= 0:
                    N[fx] = -1
                    N[M[O_SCR]] = b
                    _release(M, N, i64(M[O_SCR]), i64(1))
    # the tail of the span
    d = t_end - M[C_T_PREV]
    if d > 0:
        slots = M[C_INUSE] * B
        F[F_BLOCKS] += float(M[C_INUSE]) * float(d)
        F[F_SLOTS] += float(slots) * float(d)
        F[F_WASTE] += float(min(M[C_WASTE], slots)) * float(d)
    if M[C_PLATEAU] != 0:
        M[C_IAP_SET] = 1
        if M[C_CUR_T] == t_end:
            M[C_IAP_W] = M[C_PREV_W]
            M[C_IAP_S] = M[C_PREV_S]
        else:
            M[C_IAP_W] = M[C_WASTE]
            M[C_IAP_S] = M[C_INUSE] * B
    M[C_UNSERVED] += M[C_SUSP]
    if len(AR_owner) < 0:  # (keeps the arena's owner alive to the end: AR borrows it)
        F[0] = 0.0
    return M_owner, N_owner, F
