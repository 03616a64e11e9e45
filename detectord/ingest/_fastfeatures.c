/*
 * Hot path of per-step feature accumulation: the per-sample part of FeatureExtractor.ingest
 * (detectord/ingest/features.py) for series already bound, on the same Python objects. Optional:
 * features.py runs its own loop when this is not built, and
 * tests/ingest/test_features_differential.py checks both leave the same rows, counts and state.
 *
 * layout(series_type, instance_type)
 *   Reads where the __slots__ of features._Series and features._Instance live in their objects.
 *   Called once at import; accumulate refuses to run before.
 *
 * accumulate(keys, counts, timestamps, values, pos, first, step_ms, now)
 *     -> (pos, first, k, duplicate, stale, non_finite, late, accepted)
 *   Walks series from keys[pos] (its samples start at timestamps[first]) for as long as each is a
 *   bound series (key.state an exact _Series) and no sample needs a step closed, doing what
 *   ingest's loop does for each sample. Returns the series it stopped at, where that series'
 *   samples start, the sample to go on from (samples before it are done), and what it counted.
 *   pos == len(keys) when it did them all. Anything not as ingest leaves it (a slot unset, a
 *   list of another length) stops it before that series' first sample, for Python to do.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifndef Py_T_OBJECT_EX
#include <structmember.h>
#define Py_T_OBJECT_EX T_OBJECT_EX
#endif

enum { S_INST, S_SLOTS, S_GAUGE_SOURCE, S_LAST_TS, S_LAST_V, S_GAUGE_BINS, S_HELD, S_N };
static const char *series_slots[S_N] = {"inst", "slots", "gauge_source", "last_ts", "last_v", "gauge_bins", "held"};
enum { I_LAST_SEEN, I_LAST_DATA, I_CUR, I_RESETS, I_ACC, I_PRIMED, I_SEEN, I_MAX_TS, I_N };
static const char *instance_slots[I_N] = {"last_seen", "last_data", "cur", "resets", "acc", "primed", "seen", "max_ts"};

static PyTypeObject *series_type, *instance_type;
static PyObject *state_name; /* "state", the SeriesKey slot that holds a series' _Series */
static Py_ssize_t series_off[S_N], instance_off[I_N];

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
    PyObject *st, *it;
    if (!PyArg_ParseTuple(args, "O!O!", &PyType_Type, &st, &PyType_Type, &it)) return NULL;
    if (offsets(st, series_slots, series_off, S_N) || offsets(it, instance_slots, instance_off, I_N)) return NULL;
    if (!state_name && !(state_name = PyUnicode_InternFromString("state"))) return NULL;
    Py_XSETREF(series_type, (PyTypeObject *)Py_NewRef(st));
    Py_XSETREF(instance_type, (PyTypeObject *)Py_NewRef(it));
    Py_RETURN_NONE;
}

static int is_pair_list(PyObject *o) { return o && PyList_CheckExact(o) && PyList_GET_SIZE(o) == 2; }

static int is_int(PyObject *o) { return o && PyLong_CheckExact(o); }

/* Whether series s and its instance are as ingest leaves them: every slot set, of its type. */
static int bound_as_expected(PyObject *s) {
    for (int i = 0; i < S_N; i++)
        if (!SLOT(s, series_off[i])) return 0;
    PyObject *inst = SLOT(s, series_off[S_INST]);
    if (!Py_IS_TYPE(inst, instance_type)) return 0;
    for (int i = 0; i < I_N; i++)
        if (!SLOT(inst, instance_off[i])) return 0;
    PyObject *slots = SLOT(s, series_off[S_SLOTS]), *acc = SLOT(inst, instance_off[I_ACC]);
    if (!PyTuple_CheckExact(slots) || !is_pair_list(acc) || !is_pair_list(SLOT(inst, instance_off[I_RESETS])) ||
        !is_pair_list(SLOT(inst, instance_off[I_SEEN])) || !is_pair_list(SLOT(inst, instance_off[I_MAX_TS])) ||
        !is_pair_list(SLOT(s, series_off[S_GAUGE_BINS])) || !is_int(SLOT(inst, instance_off[I_CUR])) ||
        !is_int(SLOT(s, series_off[S_GAUGE_SOURCE])) || !is_int(SLOT(s, series_off[S_LAST_TS])) ||
        !PyFloat_CheckExact(SLOT(s, series_off[S_LAST_V])) || !PyBool_Check(SLOT(inst, instance_off[I_PRIMED])))
        return 0;
    for (int i = 0; i < 2; i++) {
        PyObject *a = PyList_GET_ITEM(acc, i);
        if (!PyList_CheckExact(a)) return 0;
        if (!is_int(PyList_GET_ITEM(SLOT(inst, instance_off[I_MAX_TS]), i))) return 0;
        Py_ssize_t n = PyList_GET_SIZE(a);
        for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(slots); j++) {
            PyObject *slot = PyTuple_GET_ITEM(slots, j);
            if (!is_int(slot)) return 0;
            long v = PyLong_AsLong(slot);
            if (v == -1 && PyErr_Occurred()) PyErr_Clear();
            if (v < 0 || v >= n || !PyFloat_CheckExact(PyList_GET_ITEM(a, v))) return 0;
        }
    }
    return 1;
}

static int64_t floor_div(int64_t a, int64_t b) {
    int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

/* Replace a slot's object with a new reference (stolen). */
static void set_slot(PyObject *obj, Py_ssize_t off, PyObject *value) { Py_XSETREF(SLOT(obj, off), value); }

static PyObject *accumulate(PyObject *self, PyObject *args) {
    PyObject *keys, *counts, *tss, *vals, *now;
    Py_ssize_t pos, first;
    long long step_ms;
    if (!PyArg_ParseTuple(args, "O!O!O!O!nnLO", &PyList_Type, &keys, &PyList_Type, &counts, &PyList_Type, &tss,
                          &PyList_Type, &vals, &pos, &first, &step_ms, &now))
        return NULL;
    if (!series_type) {
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
    PyObject *s = NULL, *inst = NULL;
    for (; pos < nkeys; pos++) {
        first = k;
        PyObject *cnt = PyList_GET_ITEM(counts, pos);
        Py_ssize_t n = PyLong_CheckExact(cnt) ? PyLong_AsSsize_t(cnt) : -1;
        if (n < 0 || first + n > nsamples) {
            PyErr_Clear();
            break;
        }
        /* Held (s, and inst below) until the series is done: replacing a slot's value frees the
         * old one, and nothing of it may free them under us. */
        Py_XSETREF(s, PyObject_GetAttr(PyList_GET_ITEM(keys, pos), state_name));
        if (!s) goto fail;
        if (!Py_IS_TYPE(s, series_type) || !bound_as_expected(s)) break;
        Py_XSETREF(inst, Py_NewRef(SLOT(s, series_off[S_INST])));
        set_slot(inst, instance_off[I_LAST_SEEN], Py_NewRef(now));
        set_slot(inst, instance_off[I_LAST_DATA], Py_NewRef(now));
        PyObject *slots = SLOT(s, series_off[S_SLOTS]);
        int gauge = PyLong_AsLong(SLOT(s, series_off[S_GAUGE_SOURCE])) >= 0;
        long long last_ts = PyLong_AsLongLong(SLOT(s, series_off[S_LAST_TS]));
        long long cur = PyLong_AsLongLong(SLOT(inst, instance_off[I_CUR]));
        if (PyErr_Occurred()) goto fail;
        Py_ssize_t end = first + n;
        for (; k < end; k++) {
            PyObject *tso = PyList_GET_ITEM(tss, k), *vo = PyList_GET_ITEM(vals, k);
            if (!PyLong_CheckExact(tso) || !PyFloat_CheckExact(vo)) goto handover;
            long long ts = PyLong_AsLongLong(tso);
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
                    set_slot(s, series_off[S_HELD], PyFloat_FromDouble(NAN));
                    if (!SLOT(s, series_off[S_HELD])) goto fail;
                } else {
                    non_finite++;
                }
                set_slot(s, series_off[S_LAST_TS], Py_NewRef(tso));
                last_ts = ts;
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
                double last = PyFloat_AS_DOUBLE(SLOT(s, series_off[S_LAST_V]));
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
                    PyObject *acc = PyList_GET_ITEM(SLOT(inst, instance_off[I_ACC]), i);
                    for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(slots); j++) {
                        Py_ssize_t slot = PyLong_AsSsize_t(PyTuple_GET_ITEM(slots, j));
                        PyObject *sum = PyFloat_FromDouble(PyFloat_AS_DOUBLE(PyList_GET_ITEM(acc, slot)) + d);
                        if (!sum) goto fail;
                        PyList_SetItem(acc, slot, sum);
                    }
                }
            } else {
                PyList_SetItem(SLOT(s, series_off[S_GAUGE_BINS]), i, Py_NewRef(vo));
            }
            set_slot(s, series_off[S_LAST_V], Py_NewRef(vo));
            set_slot(s, series_off[S_LAST_TS], Py_NewRef(tso));
            last_ts = ts;
            PyList_SetItem(SLOT(inst, instance_off[I_SEEN]), i, Py_NewRef(Py_True));
            PyObject *max_ts = SLOT(inst, instance_off[I_MAX_TS]);
            long long held = PyLong_AsLongLong(PyList_GET_ITEM(max_ts, i));
            if (held == -1 && PyErr_Occurred()) goto fail;
            if (ts > held) PyList_SetItem(max_ts, i, Py_NewRef(tso));
            accepted++;
        }
    }
    /* Stopped before series pos (k == first), or done with them all (pos == nkeys). */
handover:
    Py_XDECREF(s);
    Py_XDECREF(inst);
    return Py_BuildValue("nnnLLLLL", pos, first, k, duplicate, stale, non_finite, late, accepted);
fail:
    Py_XDECREF(s);
    Py_XDECREF(inst);
    return NULL;
}

static PyMethodDef methods[] = {
    {"layout", layout, METH_VARARGS, "Read where _Series's and _Instance's slots are."},
    {"accumulate", accumulate, METH_VARARGS, "Accumulate bound series' samples into their instances' steps."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastfeatures", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastfeatures(void) { return PyModule_Create(&module); }
