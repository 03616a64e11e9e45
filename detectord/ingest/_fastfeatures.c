/*
 * Hot path of per-step feature accumulation: the per-sample part of FeatureExtractor.ingest
 * (detectord/ingest/features.py) for series already bound, on the same Python objects. Optional:
 * features.py runs its own loop when this is not built, and
 * tests/ingest/test_features_differential.py checks both leave the same rows, counts and state.
 *
 * Series(inst, slots, gauge_source)
 *   A bound series' state, what features._Series holds, in one object: the instance, the counter
 *   slots it feeds, its gauge source (-1: a counter), its last sample (last_ts, last_v), the value
 *   a gauge holds (held) and its per-step values (gauge_bins). The numbers are C fields, not Python
 *   objects: a series costs 88 bytes instead of about 160, and a sample allocates nothing.
 *
 * layout(instance_type, key_type, counter_bins)
 *   Reads where the __slots__ of features._Instance and remote_write.SeriesKey live in their
 *   objects, and the gauge_bins every counter Series shares. Called once at import; Series,
 *   accumulate and bind refuse to run before.
 *
 * accumulate(keys, counts, timestamps, values, pos, first, step_ms, now)
 *     -> (pos, first, k, duplicate, stale, non_finite, late, accepted)
 *   Walks series from keys[pos] (its samples start at timestamps[first]) for as long as each is a
 *   bound series (key.state an exact Series) and no sample needs a step closed, doing what
 *   ingest's loop does for each sample. Returns the series it stopped at, where that series'
 *   samples start, the sample to go on from (samples before it are done), and what it counted.
 *   pos == len(keys) when it did them all. Anything not as ingest leaves it (a slot unset, sums
 *   that are not two arrays of doubles as long, a slot beyond them) stops it before that series'
 *   first sample, for Python to do.
 *
 * bind(keys, pos, bound, plan, instance_labels, no_labels, instances, plan_keys, matched, les,
 *      slot_tuples, proxy_prefix) -> pos
 *   Binds new series from keys[pos] as FeatureExtractor._bind does, for as long as each one's
 *   binding is known already: its metric has a plan, its instance exists (and knows its upstream),
 *   its match, `le` and slot tuple were seen before. A bucket the instance has no counter slot for
 *   yet gets one as _bind gives it (_Instance.add_slot, bucket_slots, bucket_order). Appends each
 *   key bound to `bound` (features.py pins them) and returns the first key it left: one bound
 *   already, one _bind must do (it makes instances, matches, slot tuples and _IGNORED), or
 *   len(keys). The other arguments are the extractor's own tables, which it only reads.
 *
 * row(program, acc, gauges, orders, elapsed, out)
 *   A closed step's feature values, what the compiled expressions of features.py give on its Step
 *   (Rate, Value, Share, and Quantile over _cumulative's buckets as bucket_quantile reads them),
 *   written into `out` (float32, one a feature). `program` (features._program): per feature, the
 *   struct "=iiqd" (op, a, b, q): rate of counter slot a; value of gauge a; share of slot a in slot
 *   b; quantile q of histogram a. acc: the step's sums (array('d')), gauges: its gauge values (a
 *   list of floats), orders: each histogram's (le, slot) list sorted by le, le a float. The same
 *   IEEE operations in the same order as Python's (built with -ffp-contract=off: no fused
 *   multiply-adds), so the same numbers bit for bit. Only floats are read as numbers, so no
 *   Python code runs while it walks the lists.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifndef Py_T_OBJECT_EX
#include <structmember.h>
#define Py_T_OBJECT_EX T_OBJECT_EX
#define Py_T_LONGLONG T_LONGLONG
#define Py_T_DOUBLE T_DOUBLE
#define Py_T_INT T_INT
#define Py_READONLY READONLY
#endif

enum { I_LAST_SEEN, I_LAST_DATA, I_CUR, I_RESETS, I_ACC, I_PRIMED, I_SEEN, I_MAX_TS, I_N };
static const char *instance_slots[I_N] = {"last_seen", "last_data", "cur", "resets", "acc", "primed", "seen", "max_ts"};
enum { B_SERIES, B_GAUGES, B_BUCKET_SLOTS, B_BUCKET_ORDER, B_LAYOUT_SHARED, B_UPSTREAMS, B_N }; /* binding's */
static const char *binding_slots[B_N] = {"series", "gauges", "bucket_slots", "bucket_order", "layout_shared",
                                         "upstreams"};
enum { K_LABELS, K_NAME, K_STATE, K_N };
static const char *key_slots[K_N] = {"labels", "name", "state"};

static PyTypeObject *instance_type, *key_type;
static PyTypeObject *sums_type; /* array.array: an instance's step sums */
static PyObject *counter_bins; /* features._COUNTER_BINS */
static PyObject *to_name, *le_name, *add_slot_name;
static Py_ssize_t instance_off[I_N], binding_off[B_N], key_off[K_N];

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

static const uint64_t STALE_NAN_BITS = 0x7FF0000000000002ULL;

static int offsets(PyObject *type, const char **names, Py_ssize_t *out, int n) {
    for (int i = 0; i < n; i++) {
        PyObject *d = PyObject_GetAttrString(type, names[i]);
        if (!d) return -1;
        int ok = Py_IS_TYPE(d, &PyMemberDescr_Type);
        if (ok) {
            PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
            ok = m->type == Py_T_OBJECT_EX;
            out[i] = m->offset;
        }
        Py_DECREF(d);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "%s is not a __slots__ attribute", names[i]);
            return -1;
        }
    }
    return 0;
}

static PyObject *layout(PyObject *self, PyObject *args) {
    PyObject *it, *kt, *bins;
    if (!PyArg_ParseTuple(args, "O!O!O!", &PyType_Type, &it, &PyType_Type, &kt, &PyList_Type, &bins)) return NULL;
    if (PyList_GET_SIZE(bins) != 2) {
        PyErr_SetString(PyExc_ValueError, "counter_bins must be a list of two");
        return NULL;
    }
    if (offsets(it, instance_slots, instance_off, I_N) || offsets(it, binding_slots, binding_off, B_N) ||
        offsets(kt, key_slots, key_off, K_N))
        return NULL;
    if (!to_name && !(to_name = PyUnicode_InternFromString("to"))) return NULL;
    if (!le_name && !(le_name = PyUnicode_InternFromString("le"))) return NULL;
    if (!add_slot_name && !(add_slot_name = PyUnicode_InternFromString("add_slot"))) return NULL;
    if (!sums_type) {
        PyObject *array = PyImport_ImportModule("array");
        if (!array) return NULL;
        sums_type = (PyTypeObject *)PyObject_GetAttrString(array, "array");
        Py_DECREF(array);
        if (!sums_type) return NULL;
    }
    Py_XSETREF(counter_bins, Py_NewRef(bins));
    Py_XSETREF(instance_type, (PyTypeObject *)Py_NewRef(it));
    Py_XSETREF(key_type, (PyTypeObject *)Py_NewRef(kt));
    Py_RETURN_NONE;
}

/* ---- Series ------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *inst;       /* its _Instance */
    PyObject *slots;      /* tuple of the counter slots it feeds (of int >= 0) */
    PyObject *gauge_bins; /* [value in the older open step, in the newer] (NaN: none), or counter_bins */
    long long last_ts;
    double last_v;
    double held; /* a gauge's value held from earlier steps (NaN once it went stale) */
    int gauge_source; /* index into the source table, -1 for counters */
} Series;

static PyTypeObject SeriesType;

/* Its callers (Series(), bind) run only after layout(), which set counter_bins. */
static Series *new_series(PyObject *inst, PyObject *slots, int gauge_source) {
    PyObject *bins = gauge_source >= 0 ? Py_BuildValue("[dd]", NAN, NAN) : Py_NewRef(counter_bins);
    if (!bins) return NULL;
    Series *s = PyObject_GC_New(Series, &SeriesType);
    if (!s) {
        Py_DECREF(bins);
        return NULL;
    }
    s->inst = Py_NewRef(inst);
    s->slots = Py_NewRef(slots);
    s->gauge_bins = bins;
    s->last_ts = -(1LL << 62);
    s->last_v = NAN;
    s->held = NAN;
    s->gauge_source = gauge_source;
    PyObject_GC_Track(s);
    return s;
}

static PyObject *series_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"inst", "slots", "gauge_source", NULL};
    PyObject *inst, *slots;
    int gauge_source;
    if (!instance_type) {
        PyErr_SetString(PyExc_RuntimeError, "layout() was not called");
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!i", kwlist, instance_type, &inst, &PyTuple_Type, &slots,
                                     &gauge_source))
        return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(slots); i++) {
        PyObject *slot = PyTuple_GET_ITEM(slots, i);
        if (!PyLong_CheckExact(slot) || PyLong_AsSsize_t(slot) < 0) {
            if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_OverflowError)) {
                PyErr_Clear();
                PyErr_SetString(PyExc_ValueError, "slots must be ints >= 0");
            }
            return NULL;
        }
    }
    return (PyObject *)new_series(inst, slots, gauge_source);
}

static int series_traverse(Series *s, visitproc visit, void *arg) {
    Py_VISIT(s->inst);
    Py_VISIT(s->slots);
    Py_VISIT(s->gauge_bins);
    return 0;
}

static int series_clear(Series *s) {
    Py_CLEAR(s->inst);
    Py_CLEAR(s->slots);
    Py_CLEAR(s->gauge_bins);
    return 0;
}

static void series_dealloc(Series *s) {
    PyObject_GC_UnTrack(s);
    series_clear(s);
    PyObject_GC_Del(s);
}

static PyMemberDef series_members[] = {
    {"inst", Py_T_OBJECT_EX, offsetof(Series, inst), Py_READONLY, NULL},
    {"slots", Py_T_OBJECT_EX, offsetof(Series, slots), Py_READONLY, NULL},
    {"gauge_source", Py_T_INT, offsetof(Series, gauge_source), Py_READONLY, NULL},
    {"gauge_bins", Py_T_OBJECT_EX, offsetof(Series, gauge_bins), 0, NULL},
    {"last_ts", Py_T_LONGLONG, offsetof(Series, last_ts), 0, NULL},
    {"last_v", Py_T_DOUBLE, offsetof(Series, last_v), 0, NULL},
    {"held", Py_T_DOUBLE, offsetof(Series, held), 0, NULL},
    {NULL},
};

static PyTypeObject SeriesType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "detectord.ingest._fastfeatures.Series",
    .tp_doc = "A bound series' state (features._Series), its numbers held in C.",
    .tp_basicsize = sizeof(Series),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = series_new,
    .tp_traverse = (traverseproc)series_traverse,
    .tp_clear = (inquiry)series_clear,
    .tp_dealloc = (destructor)series_dealloc,
    .tp_members = series_members,
};

/* ---- accumulate -------------------------------------------------------------------------- */

static int is_pair_list(PyObject *o) { return o && PyList_CheckExact(o) && PyList_GET_SIZE(o) == 2; }

static int is_int(PyObject *o) { return o && PyLong_CheckExact(o); }

/* Whether series s and its instance are as ingest leaves them: every slot set, of its type. */
static int bound_as_expected(Series *s) {
    PyObject *inst = s->inst, *slots = s->slots;
    if (!inst || !slots || !Py_IS_TYPE(inst, instance_type) || !is_pair_list(s->gauge_bins)) return 0;
    for (int i = 0; i < I_N; i++)
        if (!SLOT(inst, instance_off[i])) return 0;
    if (!PyTuple_CheckExact(slots) || !is_pair_list(SLOT(inst, instance_off[I_ACC])) ||
        !is_pair_list(SLOT(inst, instance_off[I_RESETS])) || !is_pair_list(SLOT(inst, instance_off[I_SEEN])) ||
        !is_pair_list(SLOT(inst, instance_off[I_MAX_TS])) || !is_int(SLOT(inst, instance_off[I_CUR])) ||
        !PyBool_Check(SLOT(inst, instance_off[I_PRIMED])))
        return 0;
    for (int i = 0; i < 2; i++)
        if (!is_int(PyList_GET_ITEM(SLOT(inst, instance_off[I_MAX_TS]), i))) return 0;
    return 1;
}

/* An instance's two open steps' counter sums (inst.acc: two array('d')), held writable while
 * the series of that instance are done (a buffer held keeps an array from being resized). */
typedef struct {
    PyObject *inst;
    Py_buffer view[2];
    double *sums[2];
    Py_ssize_t n; /* slots in both */
} Sums;

static void let_go(Sums *h) {
    if (!h->inst) return;
    for (int i = 0; i < 2; i++)
        if (h->sums[i]) PyBuffer_Release(&h->view[i]);
    h->sums[0] = h->sums[1] = NULL;
    Py_CLEAR(h->inst);
}

/* Hold inst's sums (if not held already); 0 where they are not two arrays of doubles as long. */
static int hold(Sums *h, PyObject *inst) {
    if (h->inst == inst) return 1;
    let_go(h);
    PyObject *acc = SLOT(inst, instance_off[I_ACC]);
    h->inst = Py_NewRef(inst);
    for (int i = 0; i < 2; i++) {
        Py_buffer *v = &h->view[i];
        if (PyObject_GetBuffer(PyList_GET_ITEM(acc, i), v, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
            PyErr_Clear();
            let_go(h);
            return 0;
        }
        h->sums[i] = v->buf;
        if (v->ndim != 1 || v->itemsize != sizeof(double) || !v->format || strcmp(v->format, "d") != 0 ||
            (i == 1 && v->len != h->view[0].len)) {
            let_go(h);
            return 0;
        }
    }
    h->n = h->view[0].len / (Py_ssize_t)sizeof(double);
    return 1;
}

/* Whether every slot in `slots` is one of the held sums. */
static int slots_fit(PyObject *slots, const Sums *h) {
    for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(slots); j++) {
        PyObject *slot = PyTuple_GET_ITEM(slots, j);
        if (!is_int(slot)) return 0;
        Py_ssize_t v = PyLong_AsSsize_t(slot);
        if (v == -1 && PyErr_Occurred()) PyErr_Clear();
        if (v < 0 || v >= h->n) return 0;
    }
    return 1;
}

/* PyLong_AsLongLong, through PyLong_AsLong where a long is as wide: a millisecond timestamp is an
 * int of two digits, which PyLong_AsLongLong converts byte by byte (_PyLong_AsByteArray) and
 * PyLong_AsLong digit by digit, in a few instructions. */
static inline long long as_long_long(PyObject *o) {
#if LONG_MAX == LLONG_MAX
    return PyLong_AsLong(o);
#else
    return PyLong_AsLongLong(o);
#endif
}

static int64_t floor_div(int64_t a, int64_t b) {
    int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

/* Replace a slot's object with a new reference (stolen). */
static void set_slot(PyObject *obj, Py_ssize_t off, PyObject *value) { Py_XSETREF(SLOT(obj, off), value); }

/* The Series keys[i] is bound to (NULL: none). */
static Series *series_at(PyObject *keys, Py_ssize_t i) {
    PyObject *sk = PyList_GET_ITEM(keys, i);
    if (!Py_IS_TYPE(sk, key_type)) return NULL;
    PyObject *state = SLOT(sk, key_off[K_STATE]);
    return state && Py_IS_TYPE(state, &SeriesType) ? (Series *)state : NULL;
}

/* Where an array.array keeps its items: right after the object's header (CPython's arraymodule.c,
 * the same since Python 2). Read only to fetch them ahead, so a layout that changed one day would
 * make a useless hint, never a wrong number. */
static const char *sums_data(PyObject *a) {
    if (!Py_IS_TYPE(a, sums_type) || sums_type->tp_basicsize < (Py_ssize_t)(sizeof(PyVarObject) + sizeof(char *)))
        return NULL;
    return *(const char **)((const char *)a + sizeof(PyVarObject));
}

/* The Series of the keys from accumulate's position to AHEAD - 1 after it (NULL: none). */
#define AHEAD 17
typedef struct {
    Series *at[32]; /* a ring, by position & 31 */
} Ahead;

/* What accumulate reads of the series ahead of pos, fetched into the cache before it: a level of
 * pointers a stage, each read from what the stage before fetched. The key 20 series ahead, its
 * Series 16 ahead, its instance's slots 12 ahead, the objects in them 9 ahead, the lists' item
 * arrays 6 ahead, the items (the two steps' sums and newest timestamps) 4 ahead, the sums the
 * series adds to 2 ahead; an instance's, only where the series before is of another. A request
 * can hold a series of each instance in turn (the fleet bench's do: one kind of series at a
 * time), and then nearly every one of these is a cache miss at thousands of instances, one
 * after the other. Hints only: every pointer read here is of an object the keys list holds,
 * checked as accumulate checks it (accumulate runs no Python code, so no key is bound anew
 * meanwhile), and nothing read decides anything. Always inlined: GCC may take a function of
 * loads and prefetches alone for one without effects and drop the call. */
static inline __attribute__((always_inline)) void fetch_ahead(PyObject *keys, Py_ssize_t nkeys, Py_ssize_t pos,
                                                              Ahead *ah) {
    static const int held[] = {I_ACC, I_SEEN, I_RESETS, I_MAX_TS, I_CUR};
    static const int lists[] = {I_ACC, I_SEEN, I_RESETS, I_MAX_TS};
    if (pos + 20 < nkeys) {
        char *sk = (char *)PyList_GET_ITEM(keys, pos + 20);
        __builtin_prefetch(sk);
        __builtin_prefetch(sk + key_off[K_STATE]);
    }
    Series *s = ah->at[(pos + 16) & 31] = pos + 16 < nkeys ? series_at(keys, pos + 16) : NULL;
    if (s) {
        __builtin_prefetch(s);
        __builtin_prefetch((char *)s + sizeof(Series) - 1);
    }
#define NEW_INSTANCE(d) \
    ((s = ah->at[(pos + (d)) & 31]) && s->inst && Py_IS_TYPE(s->inst, instance_type) && \
     (!ah->at[(pos + (d) - 1) & 31] || ah->at[(pos + (d) - 1) & 31]->inst != s->inst))
    if (NEW_INSTANCE(12))
        for (int i = 0; i < I_N; i++) __builtin_prefetch((char *)s->inst + instance_off[i]);
    if (NEW_INSTANCE(9))
        for (size_t i = 0; i < sizeof held / sizeof *held; i++) {
            PyObject *o = SLOT(s->inst, instance_off[held[i]]);
            if (o) __builtin_prefetch(o);
        }
    if (NEW_INSTANCE(6))
        for (size_t i = 0; i < sizeof lists / sizeof *lists; i++) {
            PyObject *o = SLOT(s->inst, instance_off[lists[i]]);
            if (o && PyList_CheckExact(o)) __builtin_prefetch(((PyListObject *)o)->ob_item);
        }
    if (NEW_INSTANCE(4)) {
        PyObject *acc = SLOT(s->inst, instance_off[I_ACC]), *max_ts = SLOT(s->inst, instance_off[I_MAX_TS]);
        for (int i = 0; i < 2; i++) {
            if (acc && is_pair_list(acc)) __builtin_prefetch(PyList_GET_ITEM(acc, i));
            if (max_ts && is_pair_list(max_ts)) __builtin_prefetch(PyList_GET_ITEM(max_ts, i));
        }
    }
#undef NEW_INSTANCE
    /* Where a counter adds is its own: for every series. */
    if ((s = ah->at[(pos + 2) & 31]) && s->inst && Py_IS_TYPE(s->inst, instance_type) && s->gauge_source < 0 &&
        s->slots && PyTuple_CheckExact(s->slots) && PyTuple_GET_SIZE(s->slots) > 0) {
        PyObject *acc = SLOT(s->inst, instance_off[I_ACC]), *slot = PyTuple_GET_ITEM(s->slots, 0);
        Py_ssize_t at = is_int(slot) ? PyLong_AsSsize_t(slot) : -1;
        if (at == -1) PyErr_Clear();
        if (at >= 0 && acc && is_pair_list(acc))
            for (int i = 0; i < 2; i++) {
                PyObject *sums = PyList_GET_ITEM(acc, i);
                const char *data = sums_data(sums);
                if (data && at < Py_SIZE(sums)) __builtin_prefetch(data + at * (Py_ssize_t)sizeof(double));
            }
    }
}

static PyObject *accumulate(PyObject *self, PyObject *args) {
    PyObject *keys, *counts, *tss, *vals, *now;
    Py_ssize_t pos, first;
    long long step_ms;
    if (!PyArg_ParseTuple(args, "O!O!O!O!nnLO", &PyList_Type, &keys, &PyList_Type, &counts, &PyList_Type, &tss,
                          &PyList_Type, &vals, &pos, &first, &step_ms, &now))
        return NULL;
    if (!instance_type) {
        PyErr_SetString(PyExc_RuntimeError, "layout() was not called");
        return NULL;
    }
    if (step_ms <= 0 || pos < 0 || first < 0) {
        PyErr_SetString(PyExc_ValueError, "step_ms must be > 0, pos and first >= 0");
        return NULL;
    }
    Py_ssize_t nkeys = PyList_GET_SIZE(keys), nsamples = PyList_GET_SIZE(tss);
    if (PyList_GET_SIZE(counts) != nkeys || PyList_GET_SIZE(vals) != nsamples) {
        PyErr_SetString(PyExc_ValueError, "keys and counts, timestamps and values must be as long");
        return NULL;
    }
    long long duplicate = 0, stale = 0, non_finite = 0, late = 0, accepted = 0;
    Py_ssize_t k = first;
    Series *s = NULL;
    PyObject *inst = NULL;
    Sums sums = {NULL};
    Ahead ahead;
    for (Py_ssize_t i = pos; i < pos + AHEAD - 1; i++) ahead.at[i & 31] = i < nkeys ? series_at(keys, i) : NULL;
    for (; pos < nkeys; pos++) {
        first = k;
        fetch_ahead(keys, nkeys, pos, &ahead);
        PyObject *cnt = PyList_GET_ITEM(counts, pos);
        Py_ssize_t n = PyLong_CheckExact(cnt) ? PyLong_AsSsize_t(cnt) : -1;
        if (n < 0 || first + n > nsamples) {
            PyErr_Clear();
            break;
        }
        /* Held (s, and inst below) until the series is done: replacing a slot's value frees the
         * old one, and nothing of it may free them under us. */
        Series *bound = series_at(keys, pos);
        if (!bound || !bound_as_expected(bound) || !hold(&sums, bound->inst) || !slots_fit(bound->slots, &sums))
            break;
        Py_XSETREF(s, (Series *)Py_NewRef(bound));
        Py_XSETREF(inst, Py_NewRef(s->inst));
        set_slot(inst, instance_off[I_LAST_SEEN], Py_NewRef(now));
        set_slot(inst, instance_off[I_LAST_DATA], Py_NewRef(now));
        PyObject *slots = s->slots;
        int gauge = s->gauge_source >= 0;
        long long last_ts = s->last_ts;
        long long cur = as_long_long(SLOT(inst, instance_off[I_CUR]));
        if (PyErr_Occurred()) goto fail;
        Py_ssize_t end = first + n;
        for (; k < end; k++) {
            PyObject *tso = PyList_GET_ITEM(tss, k), *vo = PyList_GET_ITEM(vals, k);
            if (!PyLong_CheckExact(tso) || !PyFloat_CheckExact(vo)) goto handover;
            long long ts = as_long_long(tso);
            if (ts == -1 && PyErr_Occurred()) {
                PyErr_Clear();
                goto handover;
            }
            double v = PyFloat_AS_DOUBLE(vo);
            if (ts <= last_ts) {
                duplicate++;
                continue;
            }
            if (!isfinite(v)) {
                uint64_t bits;
                memcpy(&bits, &v, 8);
                if (bits == STALE_NAN_BITS) {
                    stale++;
                    s->held = NAN;
                } else {
                    non_finite++;
                }
                s->last_ts = last_ts = ts;
                continue;
            }
            int64_t b = floor_div(ts, step_ms);
            if (cur < 0) {
                PyObject *c = PyLong_FromLongLong(b);
                if (!c) goto fail;
                set_slot(inst, instance_off[I_CUR], c);
                cur = b;
            } else if (b > cur + 1 || cur >= INT64_MAX - 1) {
                goto handover; /* a step closes: Python's _advance (or a bin C cannot add to) */
            }
            if (b < cur) {
                late++;
                b = cur;
            }
            Py_ssize_t i = (Py_ssize_t)(b - cur);
            if (!gauge) {
                double last = s->last_v;
                double d;
                if (last == last) {
                    d = v - last;
                    if (d < 0) {
                        d = v; /* counter reset: the process restarted */
                        PyList_SetItem(SLOT(inst, instance_off[I_RESETS]), i, Py_NewRef(Py_True));
                    }
                } else {
                    d = SLOT(inst, instance_off[I_PRIMED]) == Py_True ? v : 0.0;
                }
                if (d != 0.0) {
                    double *acc = sums.sums[i];
                    for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(slots); j++)
                        acc[PyLong_AsSsize_t(PyTuple_GET_ITEM(slots, j))] += d;
                }
            } else {
                PyList_SetItem(s->gauge_bins, i, Py_NewRef(vo));
            }
            s->last_v = v;
            s->last_ts = last_ts = ts;
            PyObject *seen = SLOT(inst, instance_off[I_SEEN]);
            if (PyList_GET_ITEM(seen, i) != Py_True) PyList_SetItem(seen, i, Py_NewRef(Py_True));
            PyObject *max_ts = SLOT(inst, instance_off[I_MAX_TS]);
            long long held = as_long_long(PyList_GET_ITEM(max_ts, i));
            if (held == -1 && PyErr_Occurred()) goto fail;
            if (ts > held) PyList_SetItem(max_ts, i, Py_NewRef(tso));
            accepted++;
        }
    }
    /* Stopped before series pos (k == first), or done with them all (pos == nkeys). */
handover:
    let_go(&sums);
    Py_XDECREF(s);
    Py_XDECREF(inst);
    return Py_BuildValue("nnnLLLLL", pos, first, k, duplicate, stale, non_finite, late, accepted);
fail:
    let_go(&sums);
    Py_XDECREF(s);
    Py_XDECREF(inst);
    return NULL;
}

/* The value of label `name` in `labels` (a tuple of (name, value) pairs of str), borrowed; the
 * last one if it repeats, as dict(labels) keeps. NULL (no error) if absent; -1 in *err on error. */
static PyObject *label_value(PyObject *labels, PyObject *name, int *err) {
    PyObject *found = NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(labels); i++) {
        PyObject *pair = PyTuple_GET_ITEM(labels, i);
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) {
            *err = -1;
            PyErr_SetString(PyExc_TypeError, "a label is not a (name, value) pair");
            return NULL;
        }
        PyObject *n = PyTuple_GET_ITEM(pair, 0);
        int eq = n == name;
        if (!eq) {
            eq = PyObject_RichCompareBool(n, name, Py_EQ);
            if (eq < 0) {
                *err = -1;
                return NULL;
            }
        }
        if (eq) found = PyTuple_GET_ITEM(pair, 1);
    }
    return found;
}

/* Dict lookups that tell "absent" (NULL, no error) from an error (NULL, error set). */
#define LOOKUP(d, k) PyDict_GetItemWithError((d), (k))

/* The counter slot of instance inst's bucket `le` of histogram source h (a new reference), made as
 * _bucket_slots makes it if it has none yet: inst.add_slot(), entered in bucket_slots[h] and in
 * order into bucket_order[h]. NULL without an error where inst is not as _bind leaves it, or
 * where the bucket is new to a layout it shares (_bind makes the layout its own first). */
static PyObject *bucket_slot(PyObject *inst, PyObject *bucket_slots, PyObject *h, PyObject *le) {
    PyObject *by_le = LOOKUP(bucket_slots, h), *slot;
    if (by_le) {
        if (!PyDict_CheckExact(by_le)) return NULL;
        if ((slot = LOOKUP(by_le, le))) return Py_NewRef(slot);
    }
    if (PyErr_Occurred() || SLOT(inst, binding_off[B_LAYOUT_SHARED]) != Py_False) return NULL;
    if (!by_le) {
        if (!(by_le = PyDict_New())) return NULL;
        int failed = PyDict_SetItem(bucket_slots, h, by_le);
        Py_DECREF(by_le); /* bucket_slots holds it */
        if (failed) return NULL;
    }
    PyObject *order = SLOT(inst, binding_off[B_BUCKET_ORDER]);
    Py_ssize_t hi = PyLong_AsSsize_t(h);
    if (PyErr_Occurred() || !PyList_CheckExact(order) || hi < 0 || hi >= PyList_GET_SIZE(order) ||
        !PyList_CheckExact(PyList_GET_ITEM(order, hi)))
        return NULL;
    order = PyList_GET_ITEM(order, hi);
    if (!(slot = PyObject_CallMethodNoArgs(inst, add_slot_name))) return NULL;
    PyObject *entry = PyTuple_Pack(2, le, slot);
    /* bisect.insort: after every entry not greater than this one */
    Py_ssize_t lo = 0, top = entry ? PyList_GET_SIZE(order) : 0;
    while (lo < top) {
        Py_ssize_t mid = (lo + top) / 2;
        int less = PyObject_RichCompareBool(entry, PyList_GET_ITEM(order, mid), Py_LT);
        if (less < 0) break;
        if (less) top = mid;
        else lo = mid + 1;
    }
    if (!entry || PyErr_Occurred() || PyDict_SetItem(by_le, le, slot) || PyList_Insert(order, lo, entry)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "bucket slot");
        Py_XDECREF(entry);
        Py_DECREF(slot);
        return NULL;
    }
    Py_DECREF(entry);
    return slot;
}

/* What _bind would bind `sk` to, if all of it is known: a new _Series (and its instance, in
 * *inst_out), or NULL: without an error, _bind must do it. */
static PyObject *bind_one(PyObject *sk, PyObject *plan, PyObject *instance_labels, PyObject *no_labels,
                          PyObject *instances, PyObject *plan_keys, PyObject *matched, PyObject *les,
                          PyObject *slot_tuples, PyObject *proxy_prefix, PyObject **inst_out) {
    int err = 0;
    PyObject *name = SLOT(sk, key_off[K_NAME]), *labels = SLOT(sk, key_off[K_LABELS]);
    if (!name || !labels || !PyUnicode_CheckExact(name) || !PyTuple_CheckExact(labels)) return NULL;
    PyObject *p = LOOKUP(plan, name);
    if (!p) return NULL;
    int has_plan = PyObject_IsTrue(p);
    if (has_plan <= 0) return NULL;
    Py_ssize_t nkey = PyTuple_GET_SIZE(instance_labels);
    PyObject *key = PyTuple_New(nkey);
    if (!key) return NULL;
    for (Py_ssize_t i = 0; i < nkey; i++) {
        PyObject *v = label_value(labels, PyTuple_GET_ITEM(instance_labels, i), &err);
        if (err) {
            Py_DECREF(key);
            return NULL;
        }
        PyTuple_SET_ITEM(key, i, Py_NewRef(v ? v : PyTuple_GET_ITEM(no_labels, i)));
    }
    PyObject *inst = LOOKUP(instances, key);
    Py_DECREF(key);
    if (!inst || !Py_IS_TYPE(inst, instance_type)) return NULL;
    for (int i = 0; i < B_N; i++)
        if (!SLOT(inst, binding_off[i])) return NULL;
    PyObject *to = label_value(labels, to_name, &err);
    if (err) return NULL;
    if (to && PyUnicode_Check(to) && PyUnicode_GET_LENGTH(to) > 0) {
        Py_ssize_t proxy = PyUnicode_Tailmatch(name, proxy_prefix, 0, PY_SSIZE_T_MAX, -1);
        if (proxy < 0) return NULL;
        PyObject *upstreams = SLOT(inst, binding_off[B_UPSTREAMS]);
        if (proxy) {
            if (!PyAnySet_CheckExact(upstreams)) return NULL;
            int known = PySet_Contains(upstreams, to);
            if (known <= 0) return NULL; /* a new upstream: _bind notes it */
        }
    }
    PyObject *pk = LOOKUP(plan_keys, name);
    if (!pk || !PyTuple_CheckExact(pk)) return NULL;
    PyObject *memo = PyTuple_New(1 + PyTuple_GET_SIZE(pk));
    if (!memo) return NULL;
    PyTuple_SET_ITEM(memo, 0, Py_NewRef(name));
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(pk); i++) {
        PyObject *v = label_value(labels, PyTuple_GET_ITEM(pk, i), &err);
        if (err) {
            Py_DECREF(memo);
            return NULL;
        }
        PyTuple_SET_ITEM(memo, i + 1, Py_NewRef(v ? v : Py_None));
    }
    PyObject *m = LOOKUP(matched, memo);
    Py_DECREF(memo);
    if (!m || !PyTuple_CheckExact(m) || PyTuple_GET_SIZE(m) != 3) return NULL;
    PyObject *slots = PyTuple_GET_ITEM(m, 0), *gauge_source = PyTuple_GET_ITEM(m, 1), *hists = PyTuple_GET_ITEM(m, 2);
    if (!PyTuple_CheckExact(slots) || !PyLong_CheckExact(gauge_source) || !PyTuple_CheckExact(hists)) return NULL;
    long gauge = PyLong_AsLong(gauge_source);
    if (gauge == -1 && PyErr_Occurred()) return NULL;
    if (PyTuple_GET_SIZE(hists)) {
        PyObject *text = label_value(labels, le_name, &err);
        if (err) return NULL;
        PyObject *le = LOOKUP(les, text ? text : Py_None);
        if (!le) return NULL;
        if (PyFloat_Check(le)) {
            Py_ssize_t nc = PyTuple_GET_SIZE(slots), nh = PyTuple_GET_SIZE(hists);
            PyObject *bucket_slots = SLOT(inst, binding_off[B_BUCKET_SLOTS]);
            if (!PyDict_CheckExact(bucket_slots)) return NULL;
            PyObject *t = PyTuple_New(nc + nh);
            if (!t) return NULL;
            for (Py_ssize_t i = 0; i < nc; i++) PyTuple_SET_ITEM(t, i, Py_NewRef(PyTuple_GET_ITEM(slots, i)));
            for (Py_ssize_t i = 0; i < nh; i++) {
                PyObject *slot = bucket_slot(inst, bucket_slots, PyTuple_GET_ITEM(hists, i), le);
                if (!slot) {
                    Py_DECREF(t);
                    return NULL;
                }
                PyTuple_SET_ITEM(t, nc + i, slot);
            }
            PyObject *held = LOOKUP(slot_tuples, t);
            Py_DECREF(t);
            if (!held) return NULL;
            slots = held;
        }
    }
    if (PyTuple_GET_SIZE(slots) == 0 && gauge < 0) return NULL;
    PyObject *gauges = NULL;
    if (gauge >= 0) {
        gauges = SLOT(inst, binding_off[B_GAUGES]);
        if (!PyList_CheckExact(gauges) || gauge >= PyList_GET_SIZE(gauges) ||
            !PyList_CheckExact(PyList_GET_ITEM(gauges, gauge)))
            return NULL;
    }
    if (!PyList_CheckExact(SLOT(inst, binding_off[B_SERIES]))) return NULL;
    if (gauge > INT_MAX || gauge < INT_MIN) return NULL;
    PyObject *s = (PyObject *)new_series(inst, slots, (int)gauge);
    if (!s) return NULL;
    if (gauges && PyList_Append(PyList_GET_ITEM(gauges, gauge), s) < 0) {
        Py_DECREF(s);
        return NULL;
    }
    *inst_out = inst;
    return s;
}

static PyObject *bind(PyObject *self, PyObject *args) {
    PyObject *keys, *bound, *plan, *instance_labels, *no_labels, *instances, *plan_keys, *matched, *les,
        *slot_tuples, *proxy_prefix;
    Py_ssize_t pos;
    if (!PyArg_ParseTuple(args, "O!nO!O!O!O!O!O!O!O!O!U", &PyList_Type, &keys, &pos, &PyList_Type, &bound,
                          &PyDict_Type, &plan, &PyTuple_Type, &instance_labels, &PyTuple_Type, &no_labels,
                          &PyDict_Type, &instances, &PyDict_Type, &plan_keys, &PyDict_Type, &matched, &PyDict_Type,
                          &les, &PyDict_Type, &slot_tuples, &proxy_prefix))
        return NULL;
    if (!key_type) {
        PyErr_SetString(PyExc_RuntimeError, "layout() was not called");
        return NULL;
    }
    if (pos < 0 || PyTuple_GET_SIZE(no_labels) != PyTuple_GET_SIZE(instance_labels)) {
        PyErr_SetString(PyExc_ValueError, "pos must be >= 0, no_labels as long as instance_labels");
        return NULL;
    }
    for (; pos < PyList_GET_SIZE(keys); pos++) {
        PyObject *sk = PyList_GET_ITEM(keys, pos);
        if (!Py_IS_TYPE(sk, key_type) || SLOT(sk, key_off[K_STATE]) != Py_None) break;
        PyObject *inst = NULL;
        Py_INCREF(sk);
        PyObject *s = bind_one(sk, plan, instance_labels, no_labels, instances, plan_keys, matched, les, slot_tuples,
                               proxy_prefix, &inst);
        if (!s) {
            Py_DECREF(sk);
            if (PyErr_Occurred()) return NULL;
            break;
        }
        int failed = PyList_Append(SLOT(inst, binding_off[B_SERIES]), sk) < 0 || PyList_Append(bound, sk) < 0;
        if (!failed) set_slot(sk, key_off[K_STATE], s);
        else Py_DECREF(s);
        Py_DECREF(sk);
        if (failed) return NULL;
    }
    return PyLong_FromSsize_t(pos);
}

enum { OP_RATE, OP_VALUE, OP_SHARE, OP_QUANTILE };

typedef struct {
    int32_t op, a;
    int64_t b;
    double q;
} Op;

static int sum_at(const double *acc, Py_ssize_t n, int64_t i, double *v) {
    if (i < 0 || i >= n) {
        PyErr_SetString(PyExc_IndexError, "a feature's counter slot is beyond the step's sums");
        return -1;
    }
    *v = acc[i];
    return 0;
}

/* The k-th (le, slot) of a histogram's order. */
static int bucket_at(PyObject *order, Py_ssize_t k, double *le, Py_ssize_t *slot) {
    PyObject *t = PyList_GET_ITEM(order, k);
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 2 || !PyFloat_Check(PyTuple_GET_ITEM(t, 0))) {
        PyErr_SetString(PyExc_TypeError, "a histogram's bucket order holds (le, slot) pairs, le a float");
        return -1;
    }
    *le = PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(t, 0));
    *slot = PyLong_AsSsize_t(PyTuple_GET_ITEM(t, 1)); /* an int, or TypeError: no __index__ is called */
    return *slot == -1 && PyErr_Occurred() ? -1 : 0;
}

/* bucket_quantile(q, _cumulative(acc, order)), in two passes over the order: its count, then the rank. */
static int quantile(double q, const double *acc, Py_ssize_t n, PyObject *order, double *out) {
    if (!PyList_Check(order)) {
        PyErr_SetString(PyExc_TypeError, "a histogram's bucket order is a list");
        return -1;
    }
    Py_ssize_t m = PyList_GET_SIZE(order);
    double le = 0.0, v, running = 0.0;
    Py_ssize_t slot;
    for (Py_ssize_t k = 0; k < m; k++) {
        if (bucket_at(order, k, &le, &slot) < 0 || sum_at(acc, n, slot, &v) < 0) return -1;
        if (v > running) running = v;
    }
    *out = 0.0;
    if (m == 0 || le != INFINITY || running <= 0) return 0;
    double rank = q * running, prev_le = 0.0, prev_cum = 0.0;
    running = 0.0;
    for (Py_ssize_t k = 0; k < m; k++) {
        if (bucket_at(order, k, &le, &slot) < 0 || sum_at(acc, n, slot, &v) < 0) return -1;
        if (v > running) running = v;
        double cum = running;
        if (cum >= rank) {
            if (le == INFINITY) {
                *out = k > 0 ? prev_le : 0.0;
                return 0;
            }
            double lower = k > 0 || le <= 0 ? prev_le : 0.0, width = cum - prev_cum;
            *out = lower + (le - lower) * (width > 0 ? (rank - prev_cum) / width : 1.0);
            return 0;
        }
        prev_le = le;
        prev_cum = cum;
    }
    if (m > 1 && bucket_at(order, m - 2, out, &slot) < 0) return -1;
    return 0;
}

/* A buffer of one format ("d", "f"), C-contiguous; writable if asked. */
static int typed_buffer(PyObject *obj, Py_buffer *view, const char *format, int writable) {
    if (PyObject_GetBuffer(obj, view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    const char *f = view->format ? view->format : "B";
    if (f[0] == '@' || f[0] == '=' || f[0] == '<') f++;
    if (strcmp(f, format) != 0) {
        PyErr_Format(PyExc_TypeError, "row: a buffer of format '%s' expected, got '%s'", format, view->format);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *row(PyObject *self, PyObject *args) {
    Py_buffer prog, sums = {0}, out = {0};
    PyObject *sums_obj, *gauges, *orders, *out_obj;
    double elapsed;
    if (!PyArg_ParseTuple(args, "y*OO!O!dO", &prog, &sums_obj, &PyList_Type, &gauges, &PyList_Type, &orders,
                          &elapsed, &out_obj))
        return NULL;
    PyObject *result = NULL;
    if (typed_buffer(sums_obj, &sums, "d", 0) < 0 || typed_buffer(out_obj, &out, "f", 1) < 0) goto done;
    Py_ssize_t nops = prog.len / (Py_ssize_t)sizeof(Op), n = sums.len / (Py_ssize_t)sizeof(double);
    if (prog.len % (Py_ssize_t)sizeof(Op) || out.len != nops * (Py_ssize_t)sizeof(float)) {
        PyErr_SetString(PyExc_ValueError, "row: a program of n features and an out of n float32 expected");
        goto done;
    }
    const double *acc = sums.buf;
    float *dst = out.buf;
    for (Py_ssize_t k = 0; k < nops; k++) {
        Op op;
        memcpy(&op, (const char *)prog.buf + k * (Py_ssize_t)sizeof(Op), sizeof(Op));
        double v, w;
        switch (op.op) {
        case OP_RATE:
            if (sum_at(acc, n, op.a, &v) < 0) goto done;
            v = v / elapsed;
            break;
        case OP_VALUE:
            if (op.a < 0 || op.a >= PyList_GET_SIZE(gauges)) {
                PyErr_SetString(PyExc_IndexError, "a feature's gauge is beyond the step's gauges");
                goto done;
            }
            if (!PyFloat_Check(PyList_GET_ITEM(gauges, op.a))) {
                PyErr_SetString(PyExc_TypeError, "a step's gauge value is a float");
                goto done;
            }
            v = PyFloat_AS_DOUBLE(PyList_GET_ITEM(gauges, op.a));
            break;
        case OP_SHARE:
            if (sum_at(acc, n, op.a, &v) < 0 || sum_at(acc, n, op.b, &w) < 0) goto done;
            if (w > 0) {
                v = v / w;
                if (!(v < 1.0)) v = 1.0; /* min(1.0, v): NaN gives 1.0 */
            } else
                v = 0.0;
            break;
        case OP_QUANTILE:
            if (op.a < 0 || op.a >= PyList_GET_SIZE(orders)) {
                PyErr_SetString(PyExc_IndexError, "a feature's histogram is beyond the instance's");
                goto done;
            }
            if (quantile(op.q, acc, n, PyList_GET_ITEM(orders, op.a), &v) < 0) goto done;
            break;
        default:
            PyErr_SetString(PyExc_ValueError, "row: an unknown operation");
            goto done;
        }
        dst[k] = (float)v;
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&prog);
    if (sums.obj) PyBuffer_Release(&sums);
    if (out.obj) PyBuffer_Release(&out);
    return result;
}

/* ---- series_values ------------------------------------------------------------------------ */

/* What series_values reads of the keys ahead, fetched before it: nearly every one is a cache miss
 * (a fleet's series are far bigger than the CPU's caches), and waiting for them one after the
 * other was much of its time. The key 12 ahead, its Series 6 ahead, the Series' gauge values 3
 * ahead: each stage reads a pointer the stage before fetched. Hints only, as in fetch_ahead:
 * nothing read here decides anything. */
static inline __attribute__((always_inline)) void fetch_values_ahead(PyObject *keys, Py_ssize_t n, Py_ssize_t i) {
    if (i + 12 < n) {
        char *sk = (char *)PyList_GET_ITEM(keys, i + 12);
        __builtin_prefetch(sk);
        __builtin_prefetch(sk + key_off[K_STATE]);
    }
    PyObject *sk = i + 6 < n ? PyList_GET_ITEM(keys, i + 6) : NULL;
    if (sk && Py_IS_TYPE(sk, key_type)) {
        PyObject *st = SLOT(sk, key_off[K_STATE]);
        if (st) {
            __builtin_prefetch(st);
            __builtin_prefetch((char *)st + sizeof(Series) - 1);
        }
    }
    sk = i + 3 < n ? PyList_GET_ITEM(keys, i + 3) : NULL;
    if (sk && Py_IS_TYPE(sk, key_type)) {
        PyObject *st = SLOT(sk, key_off[K_STATE]);
        if (st && Py_IS_TYPE(st, &SeriesType)) {
            PyObject *bins = ((Series *)st)->gauge_bins;
            if (bins && PyList_CheckExact(bins)) {
                __builtin_prefetch(bins);
                if (bins != counter_bins && PyList_GET_SIZE(bins) == 2) {
                    __builtin_prefetch(PyList_GET_ITEM(bins, 0));
                    __builtin_prefetch(PyList_GET_ITEM(bins, 1));
                }
            }
        }
    }
}

static inline void put64(char *at, uint64_t bits) {
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    bits = __builtin_bswap64(bits);
#endif
    memcpy(at, &bits, 8);
}

static inline void put_double(char *at, double v) {
    uint64_t bits;
    memcpy(&bits, &v, 8);
    put64(at, bits);
}

/* series_values(keys) -> bytes: the numbers of FeatureExtractor.instance_state's series, each key
 * bound to a Series, as five little-endian columns of len(keys): last_ts (int64), then last_v,
 * held, gauge_bins[0] and gauge_bins[1] (float64). A snapshot reads them for every series of the
 * fleet, holding the GIL; the labels are not read (an instance keeps its label block). */
static PyObject *series_values(PyObject *self, PyObject *args) {
    PyObject *keys;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &keys)) return NULL;
    if (!key_type) {
        PyErr_SetString(PyExc_RuntimeError, "layout() was not called");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(keys);
    PyObject *out = PyBytes_FromStringAndSize(NULL, 40 * n);
    if (!out) return NULL;
    char *col = PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        fetch_values_ahead(keys, n, i);
        PyObject *sk = PyList_GET_ITEM(keys, i);
        PyObject *st = Py_IS_TYPE(sk, key_type) ? SLOT(sk, key_off[K_STATE]) : NULL;
        if (!st || !Py_IS_TYPE(st, &SeriesType) || !is_pair_list(((Series *)st)->gauge_bins) ||
            !PyFloat_CheckExact(PyList_GET_ITEM(((Series *)st)->gauge_bins, 0)) ||
            !PyFloat_CheckExact(PyList_GET_ITEM(((Series *)st)->gauge_bins, 1))) {
            PyErr_Format(PyExc_TypeError, "keys[%zd] is not a bound series", i);
            Py_DECREF(out);
            return NULL;
        }
        Series *s = (Series *)st;
        put64(col + 8 * i, (uint64_t)s->last_ts);
        put_double(col + 8 * (n + i), s->last_v);
        put_double(col + 8 * (2 * n + i), s->held);
        put_double(col + 8 * (3 * n + i), PyFloat_AS_DOUBLE(PyList_GET_ITEM(s->gauge_bins, 0)));
        put_double(col + 8 * (4 * n + i), PyFloat_AS_DOUBLE(PyList_GET_ITEM(s->gauge_bins, 1)));
    }
    return out;
}

static PyMethodDef methods[] = {
    {"layout", layout, METH_VARARGS, "Read where _Instance's and SeriesKey's slots are."},
    {"accumulate", accumulate, METH_VARARGS, "Accumulate bound series' samples into their instances' steps."},
    {"bind", bind, METH_VARARGS, "Bind new series whose binding is known, as FeatureExtractor._bind does."},
    {"row", row, METH_VARARGS, "A closed step's feature values, as the compiled expressions give them."},
    {"series_values", series_values, METH_VARARGS, "The numbers of an instance's series, as instance_state packs them."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastfeatures", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastfeatures(void) {
    if (PyType_Ready(&SeriesType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddObjectRef(m, "Series", (PyObject *)&SeriesType) < 0) Py_CLEAR(m);
    return m;
}
