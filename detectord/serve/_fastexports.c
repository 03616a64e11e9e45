/* The per-instance score and anomaly lines of /metrics, written straight to UTF-8 (serve/exports.py
 * has the reference, InstanceExports._lines, and uses this where it is built).
 *
 * At 100,000 instances the Python loop took about 0.12 s of CPU, but a scrape waited 0.4-1.1 s for
 * it: the render thread takes Python's lock in turn with the ingest thread, the event loop and the
 * inference worker, a few milliseconds at a time. A slice of instances here is one call that runs
 * no Python code (unless an instance is new or its score needs Go's exponent form), so it holds
 * the lock through the slice: a few slices a scrape instead of hundreds of turns. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

/* Below it a finite score is written as Python's repr, which is Go's format there too (exports.py). */
#define GO_EXPONENT 1e6

typedef struct {
    char *p;
    Py_ssize_t n, cap;
} Buf;

static int put(Buf *b, const char *s, Py_ssize_t n) {
    if (b->n + n > b->cap) {
        Py_ssize_t cap = b->cap ? b->cap : 1 << 16;
        while (cap < b->n + n) cap *= 2;
        char *p = PyMem_Realloc(b->p, (size_t)cap);
        if (!p) {
            PyErr_NoMemory();
            return -1;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, (size_t)n);
    b->n += n;
    return 0;
}

static int put_text(Buf *b, PyObject *str) {
    if (!PyUnicode_Check(str)) {
        PyErr_Format(PyExc_TypeError, "expected str, got %.200s", Py_TYPE(str)->tp_name);
        return -1;
    }
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(str, &n);
    return u ? put(b, u, n) : -1;
}

#define PUT_LITERAL(b, s) put((b), (s), (Py_ssize_t)(sizeof(s) - 1))

static PyObject *s_count, *s_score, *s_anomalous, *s_top;

/* 1 if h's attribute is true, 0 if false, -1 on error. */
static int attr_true(PyObject *h, PyObject *name) {
    PyObject *v = PyObject_GetAttr(h, name);
    if (!v) return -1;
    int t = PyObject_IsTrue(v);
    Py_DECREF(v);
    return t;
}

static int score_line(Buf *b, PyObject *h, PyObject *labels, PyObject *go_float) {
    PyObject *score = PyObject_GetAttr(h, s_score);
    if (!score) return -1;
    int rc = -1;
    if (!PyFloat_Check(score)) {
        PyErr_Format(PyExc_TypeError, "a score must be a float, got %.200s", Py_TYPE(score)->tp_name);
        goto done;
    }
    double v = PyFloat_AS_DOUBLE(score);
    if (PUT_LITERAL(b, "detectord_anomaly_score") || put_text(b, labels) || PUT_LITERAL(b, " ")) goto done;
    if (-INFINITY < v && v < GO_EXPONENT) {
        char *r = PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0, NULL); /* float's repr */
        if (!r) goto done;
        int bad = put(b, r, (Py_ssize_t)strlen(r));
        PyMem_Free(r);
        if (bad) goto done;
    } else {
        PyObject *text = PyObject_CallOneArg(go_float, score);
        int bad = !text || put_text(b, text);
        Py_XDECREF(text);
        if (bad) goto done;
    }
    rc = PUT_LITERAL(b, "\n");
done:
    Py_DECREF(score);
    return rc;
}

/* One instance's lines; its (key, top) appended to `firing` where it has top features. */
static int instance_lines(PyObject *key, PyObject *h, PyObject *labels, PyObject *go_float, Buf *scores, Buf *flags,
                          PyObject *firing) {
    int t = attr_true(h, s_count);
    if (t < 0 || (t && score_line(scores, h, labels, go_float))) return -1;
    PyObject *anomalous = PyObject_GetAttr(h, s_anomalous);
    if (!anomalous) return -1;
    int bad = 0;
    if (anomalous != Py_None) {
        t = PyObject_IsTrue(anomalous);
        bad = t < 0 || PUT_LITERAL(flags, "detectord_anomaly") || put_text(flags, labels) ||
              (t ? PUT_LITERAL(flags, " 1.0\n") : PUT_LITERAL(flags, " 0.0\n"));
    }
    Py_DECREF(anomalous);
    if (bad) return -1;
    PyObject *top = PyObject_GetAttr(h, s_top);
    if (!top) return -1;
    t = PyObject_IsTrue(top);
    if (t > 0) {
        PyObject *pair = PyTuple_Pack(2, key, top);
        t = !pair || PyList_Append(firing, pair) ? -1 : 0;
        Py_XDECREF(pair);
    }
    Py_DECREF(top);
    return t < 0 ? -1 : 0;
}

static PyObject *bytes_of(Buf *b) { return PyBytes_FromStringAndSize(b->p ? b->p : "", b->n); }

static PyObject *render(PyObject *self, PyObject *args) {
    PyObject *history, *rendered, *render_labels, *go_float;
    Py_ssize_t pos, most;
    if (!PyArg_ParseTuple(args, "O!nnO!OO", &PyDict_Type, &history, &pos, &most, &PyDict_Type, &rendered,
                          &render_labels, &go_float))
        return NULL;
    if (pos < 0 || most < 1) {
        PyErr_SetString(PyExc_ValueError, "pos must be >= 0 and most >= 1");
        return NULL;
    }
    Buf scores = {NULL}, flags = {NULL};
    PyObject *firing = PyList_New(0), *result = NULL;
    if (!firing) return NULL;
    PyObject *key, *h;
    Py_ssize_t done = 0;
    int more = 1;
    while (done < most && (more = PyDict_Next(history, &pos, &key, &h))) {
        done++;
        /* Held: rendering a new instance's labels runs Python code. */
        Py_INCREF(key);
        Py_INCREF(h);
        PyObject *labels = PyDict_GetItemWithError(rendered, key);
        if (labels) {
            Py_INCREF(labels);
        } else if (!PyErr_Occurred() && (labels = PyObject_CallOneArg(render_labels, key)) &&
                   PyDict_SetItem(rendered, key, labels) < 0) {
            Py_CLEAR(labels);
        }
        int bad = !labels || instance_lines(key, h, labels, go_float, &scores, &flags, firing);
        Py_XDECREF(labels);
        Py_DECREF(key);
        Py_DECREF(h);
        if (bad) goto done;
    }
    if (more && done == most && !PyDict_Next(history, &(Py_ssize_t){pos}, &key, &h)) more = 0;
    PyObject *s = bytes_of(&scores), *f = s ? bytes_of(&flags) : NULL;
    if (s && f) result = Py_BuildValue("nNNO", more ? pos : (Py_ssize_t)-1, s, f, firing);
    else {
        Py_XDECREF(s);
        Py_XDECREF(f);
    }
done:
    PyMem_Free(scores.p);
    PyMem_Free(flags.p);
    Py_DECREF(firing);
    return result;
}

static PyMethodDef methods[] = {
    {"render", render, METH_VARARGS,
     "render(history, pos, most, rendered, render_labels, go_float) -> (next pos or -1, score lines, "
     "anomaly lines, [(key, top)])\n\nThe lines of at most `most` instances of `history` from dict position "
     "`pos`, as InstanceExports._lines writes them."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastexports", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastexports(void) {
    if (!(s_count = PyUnicode_InternFromString("count")) || !(s_score = PyUnicode_InternFromString("score")) ||
        !(s_anomalous = PyUnicode_InternFromString("anomalous")) || !(s_top = PyUnicode_InternFromString("top")))
        return NULL;
    return PyModule_Create(&module);
}
