/*
 * Hot path of remote write decoding: walks a decompressed prometheus.WriteRequest (1.0) or
 * io.prometheus.write.v2.Request (2.0) and returns its series keyed by a digest of their raw label
 * bytes (a 2.0 series' labels as the 1.0 bytes of the same labels), so a series seen before costs
 * one hash and one table lookup, and a new one with plainly valid labels is checked and built here
 * too. Optional: detectord/ingest/remote_write.py falls back to pure Python when it is not built, and
 * tests/ingest/test_decoder_differential.py checks both give the same result.
 *
 * decode_v1(data, cache, resolve, check_hist, max_ts, start, max_series, keys, counts, timestamps, values, keep,
 *           shared, max_labels, max_name, max_value, tables)
 *     -> (samples, histograms, exemplars, metadata, rejects, next, ignored)
 *   Appends each accepted series' SeriesKey to keys, its number of samples to counts, and its
 *   samples to the flat lists timestamps and values: no per-sample container objects, so the
 *   cyclic GC has nothing to scan. Decodes at most max_series TimeSeries from byte offset start
 *   and returns where it stopped (len(data) at the end), so the caller can let other threads
 *   take the GIL between chunks.
 *   cache:   DigestMap  digest -> SeriesKey | str (the reason the labels are invalid); the digest
 *            is the keyed SipHash-2-4-128 of the raw label bytes (see siphash128), 16 bytes
 *   resolve: callable(digest, [(name, value), ...] | None) -> SeriesKey | str, called on a
 *            cache miss (it fills the cache); None when a label is not valid protobuf or UTF-8.
 *            For a plainly valid set (see checked_labels) it is called as resolve(digest,
 *            labels, True) instead, with the labels a sorted tuple of the (name, value)
 *            pairs held in the dict shared: nothing is left to check.
 *   check_hist: callable([raw Histogram bytes, ...]) -> None | str (why they are invalid)
 *   shared, max_labels, max_name, max_value: the pairs plainly valid sets are made of (None: no
 *            set is taken as plainly valid), and the limits resolve checks (0: none).
 *   tables:  None, or the label cache's (old, pinned, keys, old_keys, made), old a DigestMap: a
 *            plainly valid set whose digest is in neither cache nor old is entered in cache here
 *            as resolve would:
 *            with the key pinned or keys holds for its labels (a restart's first round), or if
 *            old_keys does not hold them either, with a SeriesKey made here (see key_type) and
 *            entered in keys. made (a list of four) gets how many keys were made, their labels
 *            and their characters, and how many entries in cache were made for keys held, also
 *            when decoding fails, for the cache's estimate.
 *   rejects: list of (SeriesKey | str, n_samples, why, detail) with why in {"labels", "histogram",
 *            "no_samples", "future"}; detail is check_hist's reason for "histogram", else None
 *   keep:    None, or a tuple of metric names (bytes): a float series whose one `__name__` names
 *            another metric (not empty) is only counted, in ignored (its samples) and exemplars,
 *            before its labels are looked up or checked (a whole cluster's series cost little).
 *            A series with native histograms or an empty name still takes the full path: they
 *            are rare, and a receiver must refuse the invalid ones whatever their metric.
 *   histograms and exemplars count those of accepted (and ignored) series only.
 * Raises ValueError on a malformed message.
 *
 * scan(data, series_field, other_field, max_series) -> (series, first_unknown_field)
 *   Walks the top-level fields only: how many series a request holds (before any is decoded, so
 *   the series limit costs a few nanoseconds per series; it stops at max_series + 1) and the
 *   first field the message its Content-Type names does not have (0 if none).
 *
 * Both follow the protobuf library's (upb's) rules exactly, because remote_write.py's pure Python
 * path uses it and the two must accept and refuse the same bodies: field number 0, tags longer
 * than 5 bytes or above 2^32, wire types 6 and 7 and unbalanced groups are malformed; unknown
 * fields (groups included, at most 100 levels deep counting message nesting) are skipped.
 *
 * key_type(SeriesKey)
 *   The class of the keys decode_v1 and decode_v2 make (its __slots__ must be labels, name, state).
 *
 * pin_keys(keys, pinned, young, old) -> (keys newly pinned, their labels, their characters)
 *   LabelCache.pin for each SeriesKey of the list keys, in one call.
 *
 * intern_labels(sets, shared, pinned, keys, old_keys, intern) -> ([SeriesKey, ...], made)
 *   LabelCache.intern for each label set of the list sets, in one call (a restore's series).
 *
 * DigestMap()
 *   A dict from 16-byte digests to objects with the digests held in the table (see its comment):
 *   the label cache's two generations, which decode_v1 and decode_v2 look digests up in.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
} cursor;

static int read_varint(cursor *c, uint64_t *out) {
    uint64_t v = 0;
    int shift = 0;
    while (c->p < c->end && shift < 64) {
        uint8_t b = *c->p++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return 0;
        }
        shift += 7;
    }
    return -1;
}

/* A field's tag as upb reads it: at most 5 bytes, below 2^32, field number not 0. */
static int read_tag(cursor *c, uint32_t *field, unsigned *wt) {
    uint64_t v = 0;
    for (int i = 0; i < 5; i++) {
        if (c->p >= c->end) return -1;
        uint8_t b = *c->p++;
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            if (v > 0xFFFFFFFFu || (v >> 3) == 0) return -1;
            *field = (uint32_t)(v >> 3);
            *wt = (unsigned)(v & 7);
            return 0;
        }
    }
    return -1;
}

#define MAX_DEPTH 100

/* Skips one unknown field of wire type wt; 0 on success. depth: group levels still allowed. */
static int skip_field(cursor *c, uint32_t field, unsigned wt, int depth) {
    uint64_t n;
    switch (wt) {
    case 0:
        return read_varint(c, &n);
    case 1:
        if (c->end - c->p < 8) return -1;
        c->p += 8;
        return 0;
    case 2:
        if (read_varint(c, &n) || (uint64_t)(c->end - c->p) < n) return -1;
        c->p += n;
        return 0;
    case 3:
        if (depth <= 0) return -1;
        for (;;) {
            uint32_t f;
            unsigned w;
            if (read_tag(c, &f, &w)) return -1;
            if (w == 4) return f == field ? 0 : -1;
            if (skip_field(c, f, w, depth - 1)) return -1;
        }
    case 5:
        if (c->end - c->p < 4) return -1;
        c->p += 4;
        return 0;
    default:
        return -1;
    }
}

static int read_len(cursor *c, cursor *sub) {
    uint64_t n;
    if (read_varint(c, &n) || (uint64_t)(c->end - c->p) < n) return -1;
    sub->p = c->p;
    sub->end = c->p + n;
    c->p += n;
    return 0;
}

typedef struct {
    int64_t *ts;
    double *val;
    Py_ssize_t n, cap;
    int64_t latest; /* the latest timestamp of the n (INT64_MIN: none) */
} samplebuf;

/* Parses one Sample message into buf. */
static int parse_sample(cursor s, samplebuf *buf) {
    double value = 0.0;
    int64_t ts = 0;
    while (s.p < s.end) {
        uint32_t field;
        unsigned wt;
        if (read_tag(&s, &field, &wt)) return -1;
        if (field == 1 && wt == 1) {
            if (s.end - s.p < 8) return -1;
            memcpy(&value, s.p, 8); /* little-endian hosts only; checked at import */
            s.p += 8;
        } else if (field == 2 && wt == 0) {
            uint64_t v;
            if (read_varint(&s, &v)) return -1;
            ts = (int64_t)v;
        } else if (skip_field(&s, field, wt, MAX_DEPTH - 2)) {
            return -1;
        }
    }
    if (buf->n == buf->cap) {
        Py_ssize_t cap = buf->cap ? buf->cap * 2 : 16;
        int64_t *t = PyMem_Realloc(buf->ts, (size_t)cap * sizeof(int64_t));
        if (!t) return -2;
        buf->ts = t;
        double *v = PyMem_Realloc(buf->val, (size_t)cap * sizeof(double));
        if (!v) return -2;
        buf->val = v;
        buf->cap = cap;
    }
    buf->ts[buf->n] = ts;
    buf->val[buf->n] = value;
    buf->n++;
    if (ts > buf->latest) buf->latest = ts;
    return 0;
}

static int append_new(PyObject *list, PyObject *item) {
    if (!item) return -1;
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

/* [(name, value), ...] of the Label fields in raw, or Py_None (new reference) if one is malformed. */
static PyObject *label_pairs(const uint8_t *p, const uint8_t *end) {
    PyObject *pairs = PyList_New(0);
    if (!pairs) return NULL;
    cursor c = {p, end};
    while (c.p < c.end) {
        uint32_t tf;
        unsigned tw;
        cursor lab;
        if (read_tag(&c, &tf, &tw)) goto bad;
        if (tf != 1 || tw != 2) {
            if (skip_field(&c, tf, tw, MAX_DEPTH - 1)) goto bad;
            continue;
        }
        if (read_len(&c, &lab)) goto bad;
        cursor name = {NULL, NULL}, value = {NULL, NULL};
        while (lab.p < lab.end) {
            uint32_t lf;
            unsigned lw;
            cursor str;
            if (read_tag(&lab, &lf, &lw)) goto bad;
            if ((lf != 1 && lf != 2) || lw != 2) {
                if (skip_field(&lab, lf, lw, MAX_DEPTH)) goto bad;
                continue;
            }
            if (read_len(&lab, &str)) goto bad;
            cursor *slot = lf == 1 ? &name : &value;
            if (slot->p != NULL) {
                /* A repeated field: the last one counts, but protobuf checks every one's UTF-8. */
                PyObject *prev = PyUnicode_DecodeUTF8((const char *)slot->p, slot->end - slot->p, "strict");
                if (!prev) {
                    if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                        PyErr_Clear();
                        goto bad;
                    }
                    Py_DECREF(pairs);
                    return NULL;
                }
                Py_DECREF(prev);
            }
            *slot = str;
        }
        PyObject *n = PyUnicode_DecodeUTF8((const char *)name.p, name.end - name.p, "strict");
        PyObject *v = n ? PyUnicode_DecodeUTF8((const char *)value.p, value.end - value.p, "strict") : NULL;
        if (!n || !v) {
            Py_XDECREF(n);
            Py_XDECREF(v);
            if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                PyErr_Clear();
                goto bad;
            }
            Py_DECREF(pairs);
            return NULL;
        }
        PyObject *pair = PyTuple_Pack(2, n, v);
        Py_DECREF(n);
        Py_DECREF(v);
        if (!pair || PyList_Append(pairs, pair)) {
            Py_XDECREF(pair);
            Py_DECREF(pairs);
            return NULL;
        }
        Py_DECREF(pair);
    }
    return pairs;
bad:
    Py_DECREF(pairs);
    Py_RETURN_NONE;
}

/* One Label field's part in finding a series' metric name. state: 0 while no `__name__` label
 * was seen, 1 once one was (its value in *name), -1 once the name cannot be told cheaply (a second
 * `__name__`, one without a value, a Label that is not plainly one name and one value: such series
 * take the full path, which judges them). Returns the new state. */
static int name_step(cursor lab, int state, cursor *name_out) {
    cursor name = {NULL, NULL}, value = {NULL, NULL};
    const uint8_t *p = lab.p;
    Py_ssize_t len = lab.end - lab.p;
    /* As every Prometheus sends it: name, value, each shorter than 128 bytes. */
    if (len >= 4 && p[0] == 0x0a && p[1] < 0x80 && 2 + p[1] + 2 <= len && p[2 + p[1]] == 0x12 &&
        p[3 + p[1]] < 0x80 && 4 + p[1] + p[3 + p[1]] == len) {
        if (p[1] != 8 || memcmp(p + 2, "__name__", 8) != 0) return state;
        if (state == 1) return -1;
        name_out->p = p + 12;
        name_out->end = lab.end;
        return 1;
    }
    while (lab.p < lab.end) {
        uint32_t lf;
        unsigned lw;
        cursor str;
        if (read_tag(&lab, &lf, &lw) || (lf != 1 && lf != 2) || lw != 2 || read_len(&lab, &str)) return -1;
        cursor *slot = lf == 1 ? &name : &value;
        if (slot->p != NULL) return -1;
        *slot = str;
    }
    if (name.p != NULL && name.end - name.p == 8 && memcmp(name.p, "__name__", 8) == 0) {
        if (state == 1 || value.p == NULL) return -1;
        *name_out = value;
        return 1;
    }
    return state;
}

#define MAX_PLAIN_LABELS 64
/* Interned strings were immortal in CPython 3.12.0 to 3.12.4 (gh-113993): there, interning the
 * label values a hostile writer makes up would keep every one for good. Set at import. */
static int intern_strings = 1;

/* The pairs of `shared` found lately, by a hash of their name and value bytes: a known pair costs
 * a hash and a compare instead of two strings, a tuple and a dict lookup made for it. Every pair
 * here is in `shared` (the dict held in pairs_of, a strong reference so its address is not reused):
 * the owner starts a new dict at each turn of its cache, and then this starts afresh too. */
#define PAIR_CACHE 16384
static PyObject *pair_cache[PAIR_CACHE];
static PyObject *pairs_of;
static uint64_t pair_seed;

static size_t pair_slot(const cursor *name, const cursor *value) {
    uint64_t h = 0xcbf29ce484222325ULL ^ pair_seed; /* FNV-1a; a collision only costs a miss */
    for (const uint8_t *q = name->p; q < name->end; q++) h = (h ^ *q) * 0x100000001b3ULL;
    h = (h ^ 0xff) * 0x100000001b3ULL; /* 0xff is never in UTF-8: "ab","c" is not "a","bc" */
    for (const uint8_t *q = value->p; q < value->end; q++) h = (h ^ *q) * 0x100000001b3ULL;
    return (size_t)(h >> 50) & (PAIR_CACHE - 1);
}

static int same_utf8(PyObject *str, const cursor *c) {
    Py_ssize_t len;
    const char *u;
    if (PyUnicode_IS_COMPACT_ASCII(str)) {
        u = (const char *)PyUnicode_DATA(str);
        len = PyUnicode_GET_LENGTH(str);
    } else {
        u = PyUnicode_AsUTF8AndSize(str, &len);
    }
    if (!u) {
        PyErr_Clear();
        return 0;
    }
    return len == c->end - c->p && memcmp(u, c->p, (size_t)len) == 0;
}

/* The pair of `shared` whose bytes these are, if cached (borrowed), else NULL. */
static PyObject *cached_pair(PyObject *shared, const cursor *name, const cursor *value, size_t *slot) {
    if (shared != pairs_of) {
        for (size_t i = 0; i < PAIR_CACHE; i++) Py_CLEAR(pair_cache[i]);
        Py_XSETREF(pairs_of, Py_NewRef(shared));
    }
    *slot = pair_slot(name, value);
    PyObject *pair = pair_cache[*slot];
    if (pair && same_utf8(PyTuple_GET_ITEM(pair, 0), name) && same_utf8(PyTuple_GET_ITEM(pair, 1), value)) return pair;
    return NULL;
}

/* The pair of shared (dict) equal to `pair`, a 2-tuple of str: held there, or made of interned
 * strings and entered (LabelCache._shared, for one pair). A new reference; NULL on error. */
static PyObject *shared_pair(PyObject *shared, PyObject *pair) {
    PyObject *held = PyDict_GetItemWithError(shared, pair); /* borrowed */
    if (held) return Py_NewRef(held);
    if (PyErr_Occurred()) return NULL;
    PyObject *name = Py_NewRef(PyTuple_GET_ITEM(pair, 0)), *value = Py_NewRef(PyTuple_GET_ITEM(pair, 1));
    if (intern_strings) {
        PyUnicode_InternInPlace(&name);
        PyUnicode_InternInPlace(&value);
    }
    PyObject *made = PyTuple_Pack(2, name, value);
    Py_DECREF(name);
    Py_DECREF(value);
    if (made && PyDict_SetItem(shared, made, made)) Py_CLEAR(made);
    return made;
}

/* A label set as most series are, known valid without Python: every Label plainly one name and
 * one value (each once, nothing else), names strictly ascending by bytes (so in order, unique and
 * not empty; UTF-8 keeps code point order), no value empty, a `__name__`, valid UTF-8, and within
 * the limits even counted in bytes (0: none). Then the tuple of its (name, value) pairs, each the
 * one pair `shared` (dict) holds for it, of interned strings. Py_None (new reference) for any other
 * set: the reference path in Python judges it, and says why. */
static PyObject *checked_labels(const uint8_t *p, const uint8_t *end, PyObject *shared, Py_ssize_t max_labels,
                                Py_ssize_t max_name, Py_ssize_t max_value) {
    cursor names[MAX_PLAIN_LABELS], values[MAX_PLAIN_LABELS];
    Py_ssize_t n = 0;
    int has_name = 0;
    cursor c = {p, end};
    while (c.p < c.end) {
        uint32_t tf;
        unsigned tw;
        cursor lab;
        if (read_tag(&c, &tf, &tw) || tf != 1 || tw != 2 || read_len(&c, &lab)) goto other;
        if (n == MAX_PLAIN_LABELS) goto other;
        cursor name = {NULL, NULL}, value = {NULL, NULL};
        while (lab.p < lab.end) {
            uint32_t lf;
            unsigned lw;
            cursor str;
            if (read_tag(&lab, &lf, &lw) || (lf != 1 && lf != 2) || lw != 2 || read_len(&lab, &str)) goto other;
            cursor *slot = lf == 1 ? &name : &value;
            if (slot->p != NULL) goto other;
            *slot = str;
        }
        Py_ssize_t nlen = name.end - name.p, vlen = value.end - value.p;
        if (name.p == NULL || value.p == NULL || nlen == 0 || vlen == 0) goto other;
        if ((max_name && nlen > max_name) || (max_value && vlen > max_value)) goto other;
        if (n > 0) {
            Py_ssize_t plen = names[n - 1].end - names[n - 1].p;
            int cmp = memcmp(names[n - 1].p, name.p, (size_t)(plen < nlen ? plen : nlen));
            if (cmp > 0 || (cmp == 0 && plen >= nlen)) goto other;
        }
        if (nlen == 8 && memcmp(name.p, "__name__", 8) == 0) has_name = 1;
        names[n] = name;
        values[n] = value;
        n++;
    }
    if (!has_name || (max_labels && n > max_labels)) goto other;
    PyObject *labels = PyTuple_New(n);
    if (!labels) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        size_t slot;
        PyObject *known = cached_pair(shared, &names[i], &values[i], &slot);
        if (known) {
            PyTuple_SET_ITEM(labels, i, Py_NewRef(known));
            continue;
        }
        PyObject *k = PyUnicode_DecodeUTF8((const char *)names[i].p, names[i].end - names[i].p, "strict");
        PyObject *v = k ? PyUnicode_DecodeUTF8((const char *)values[i].p, values[i].end - values[i].p, "strict") : NULL;
        PyObject *pair = v ? PyTuple_Pack(2, k, v) : NULL;
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (!pair) {
            Py_DECREF(labels);
            if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                PyErr_Clear();
                goto other;
            }
            return NULL;
        }
        Py_SETREF(pair, shared_pair(shared, pair));
        if (!pair) {
            Py_DECREF(labels);
            return NULL;
        }
        Py_XSETREF(pair_cache[slot], Py_NewRef(pair));
        PyTuple_SET_ITEM(labels, i, pair);
    }
    return labels;
other:
    Py_RETURN_NONE;
}

/* SipHash-2-4 with its 128-bit output (Aumasson and Bernstein; written from the paper), keyed at
 * import with os.urandom: the label cache is keyed by this digest of a series' raw label bytes, not
 * by the bytes, so a series held costs 16 bytes of key instead of its labels again (about 350
 * bytes), and a writer cannot make two label sets collide without the key. */
static uint64_t sip_k0, sip_k1;

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                                           \
    do {                                                                                                   \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                                          \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                                             \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                                             \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                                          \
    } while (0)

static void siphash128(const uint8_t *in, size_t len, uint64_t k0, uint64_t k1, uint8_t out[16]) {
    uint64_t v0 = 0x736f6d6570736575ULL ^ k0, v1 = 0x646f72616e646f6dULL ^ k1;
    uint64_t v2 = 0x6c7967656e657261ULL ^ k0, v3 = 0x7465646279746573ULL ^ k1;
    v1 ^= 0xee;
    const uint8_t *end = in + (len & ~(size_t)7);
    for (; in != end; in += 8) {
        uint64_t m;
        memcpy(&m, in, 8); /* little-endian host (checked at import) */
        v3 ^= m;
        SIPROUND; SIPROUND;
        v0 ^= m;
    }
    uint64_t b = (uint64_t)len << 56;
    switch (len & 7) {
    case 7: b |= (uint64_t)in[6] << 48; /* fall through */
    case 6: b |= (uint64_t)in[5] << 40; /* fall through */
    case 5: b |= (uint64_t)in[4] << 32; /* fall through */
    case 4: b |= (uint64_t)in[3] << 24; /* fall through */
    case 3: b |= (uint64_t)in[2] << 16; /* fall through */
    case 2: b |= (uint64_t)in[1] << 8;  /* fall through */
    case 1: b |= (uint64_t)in[0];
    }
    v3 ^= b;
    SIPROUND; SIPROUND;
    v0 ^= b;
    v2 ^= 0xee;
    SIPROUND; SIPROUND; SIPROUND; SIPROUND;
    uint64_t h = v0 ^ v1 ^ v2 ^ v3;
    memcpy(out, &h, 8);
    v1 ^= 0xdd;
    SIPROUND; SIPROUND; SIPROUND; SIPROUND;
    h = v0 ^ v1 ^ v2 ^ v3;
    memcpy(out + 8, &h, 8);
}

/* ---- DigestMap: the label cache's generations ---- */

/* A dict from the 16-byte label digests (bytes) to what they mean: LabelCache's two generations.
 * The digests sit in the table itself. A dict of bytes keys cost a bytes object and a dict slot a
 * series (about 100 bytes) and three dependent memory reads a lookup, a fleet's label cache being
 * far bigger than the CPU's caches; this costs a 24-byte slot at 44-88 % load and one read.
 * Linear probing, deletion by backward shift (no tombstones); a digest is a keyed SipHash, so its
 * first 8 bytes spread the slots evenly. Any other key (the pure-Python decoder's tuples of label
 * messages) goes to a plain dict beside it: to Python it is a dict. */
typedef struct {
    uint64_t a, b;
    PyObject *v; /* NULL: an empty slot */
} dm_slot;

typedef struct {
    PyObject_HEAD
    dm_slot *t; /* NULL while empty */
    size_t mask; /* slots - 1 */
    Py_ssize_t n;
    PyObject *other; /* dict of the other keys, or NULL */
} DigestMap;

static PyTypeObject DigestMapType;

#define DM_MIN_SLOTS 16

static int as_digest(PyObject *key, uint64_t *a, uint64_t *b) {
    if (!PyBytes_CheckExact(key) || PyBytes_GET_SIZE(key) != 16) return 0;
    memcpy(a, PyBytes_AS_STRING(key), 8);
    memcpy(b, PyBytes_AS_STRING(key) + 8, 8);
    return 1;
}

/* The slot of (a, b), or the empty slot where it would go (the table is never full). */
static dm_slot *dm_probe(const DigestMap *m, uint64_t a, uint64_t b) {
    for (size_t i = (size_t)a & m->mask;; i = (i + 1) & m->mask) {
        dm_slot *s = &m->t[i];
        if (!s->v || (s->a == a && s->b == b)) return s;
    }
}

/* The value of (a, b), borrowed, or NULL. */
static PyObject *dm_get(const DigestMap *m, uint64_t a, uint64_t b) { return m->t ? dm_probe(m, a, b)->v : NULL; }

#if defined(__linux__) && defined(MADV_HUGEPAGE)
#define DM_HUGE ((size_t)2 << 20)
#endif

/* A table of `slots` empty slots. Each lookup reads a slot at random, and a fleet's table takes
 * hundreds of megabytes: in 4 KiB pages nearly every lookup also walks the page tables, which the
 * decoder's prefetch waits for. So a table of 2 MiB or more is mapped on its own, 2 MiB aligned
 * and advised for transparent huge pages (plain pages where the kernel has none). */
static dm_slot *dm_alloc(size_t slots) {
#ifdef DM_HUGE
    size_t bytes = slots * sizeof(dm_slot); /* a multiple of the page size at this size */
    if (bytes >= DM_HUGE) {
        size_t span = bytes + DM_HUGE;
        char *p = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return NULL;
        char *start = (char *)(((uintptr_t)p + DM_HUGE - 1) & ~(uintptr_t)(DM_HUGE - 1));
        if (start > p) munmap(p, (size_t)(start - p));
        if (p + span > start + bytes) munmap(start + bytes, (size_t)(p + span - (start + bytes)));
        (void)madvise(start, bytes, MADV_HUGEPAGE);
        return (dm_slot *)start;
    }
#endif
    return PyMem_Calloc(slots, sizeof(dm_slot));
}

static void dm_free(dm_slot *t, size_t slots) {
    if (!t) return;
#ifdef DM_HUGE
    if (slots * sizeof(dm_slot) >= DM_HUGE) {
        munmap(t, slots * sizeof(dm_slot));
        return;
    }
#endif
    PyMem_Free(t);
}

static int dm_resize(DigestMap *m, size_t slots) {
    dm_slot *t = dm_alloc(slots);
    if (!t) {
        PyErr_NoMemory();
        return -1;
    }
    dm_slot *old = m->t;
    size_t n_old = old ? m->mask + 1 : 0;
    m->t = t;
    m->mask = slots - 1;
    for (size_t i = 0; i < n_old; i++)
        if (old[i].v) *dm_probe(m, old[i].a, old[i].b) = old[i];
    dm_free(old, n_old);
    return 0;
}

/* (a, b) -> v (which it takes a reference to). 0, or -1 with an exception set. */
static int dm_set(DigestMap *m, uint64_t a, uint64_t b, PyObject *v) {
    if (!m->t && dm_resize(m, DM_MIN_SLOTS)) return -1;
    dm_slot *s = dm_probe(m, a, b);
    if (s->v) {
        PyObject *was = s->v;
        s->v = Py_NewRef(v);
        Py_DECREF(was);
        return 0;
    }
    size_t slots = m->mask + 1;
    if ((size_t)m->n + 1 > slots - slots / 8) {
        if (dm_resize(m, 2 * slots)) return -1;
        s = dm_probe(m, a, b);
    }
    s->a = a;
    s->b = b;
    s->v = Py_NewRef(v);
    m->n++;
    return 0;
}

/* Takes (a, b) out: its value (the table's reference), or NULL if absent (no exception). */
static PyObject *dm_take(DigestMap *m, uint64_t a, uint64_t b) {
    if (!m->t) return NULL;
    dm_slot *s = dm_probe(m, a, b);
    PyObject *v = s->v;
    if (!v) return NULL;
    size_t i = (size_t)(s - m->t);
    for (size_t j = (i + 1) & m->mask; m->t[j].v; j = (j + 1) & m->mask) {
        /* The entry at j moves back into the hole at i unless its home slot lies after i. */
        size_t home = (size_t)m->t[j].a & m->mask;
        if (((j - home) & m->mask) >= ((j - i) & m->mask)) {
            m->t[i] = m->t[j];
            i = j;
        }
    }
    m->t[i].v = NULL;
    m->n--;
    return v;
}

static int dm_clear(DigestMap *m) {
    dm_slot *t = m->t;
    size_t n = t ? m->mask + 1 : 0;
    m->t = NULL; /* emptied before any value goes, whatever their deallocation does */
    m->mask = 0;
    m->n = 0;
    for (size_t i = 0; i < n; i++) Py_XDECREF(t[i].v);
    dm_free(t, n);
    Py_CLEAR(m->other);
    return 0;
}

static int dm_traverse(DigestMap *m, visitproc visit, void *arg) {
    if (m->t)
        for (size_t i = 0; i <= m->mask; i++) Py_VISIT(m->t[i].v);
    Py_VISIT(m->other);
    return 0;
}

static void dm_dealloc(DigestMap *m) {
    PyObject_GC_UnTrack(m);
    dm_clear(m);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static Py_ssize_t dm_length(DigestMap *m) { return m->n + (m->other ? PyDict_GET_SIZE(m->other) : 0); }

/* The value of key, borrowed; NULL without an exception if absent, with one on error. */
static PyObject *dm_lookup(DigestMap *m, PyObject *key) {
    uint64_t a, b;
    if (as_digest(key, &a, &b)) return dm_get(m, a, b);
    return m->other ? PyDict_GetItemWithError(m->other, key) : NULL;
}

static PyObject *dm_subscript(DigestMap *m, PyObject *key) {
    PyObject *v = dm_lookup(m, key);
    if (!v && !PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, key);
    return Py_XNewRef(v);
}

/* key's value taken out (a new reference), or NULL: absent (no exception) or an error. */
static PyObject *dm_pop_key(DigestMap *m, PyObject *key) {
    uint64_t a, b;
    if (as_digest(key, &a, &b)) return dm_take(m, a, b);
    PyObject *v = m->other ? PyDict_GetItemWithError(m->other, key) : NULL;
    if (v && (Py_INCREF(v), PyDict_DelItem(m->other, key))) Py_CLEAR(v);
    return v;
}

static int dm_ass_subscript(DigestMap *m, PyObject *key, PyObject *v) {
    uint64_t a, b;
    if (v) {
        if (as_digest(key, &a, &b)) return dm_set(m, a, b, v);
        if (!m->other && !(m->other = PyDict_New())) return -1;
        return PyDict_SetItem(m->other, key, v);
    }
    PyObject *was = dm_pop_key(m, key);
    if (!was) {
        if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, key);
        return -1;
    }
    Py_DECREF(was);
    return 0;
}

static int dm_contains(DigestMap *m, PyObject *key) { return dm_lookup(m, key) ? 1 : (PyErr_Occurred() ? -1 : 0); }

static PyObject *dm_get_method(DigestMap *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get() takes a key and an optional default");
        return NULL;
    }
    PyObject *v = dm_lookup(m, args[0]);
    if (!v && PyErr_Occurred()) return NULL;
    return Py_NewRef(v ? v : nargs == 2 ? args[1] : Py_None);
}

static PyObject *dm_pop(DigestMap *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "pop() takes a key and an optional default");
        return NULL;
    }
    PyObject *v = dm_pop_key(m, args[0]);
    if (v || PyErr_Occurred()) return v;
    if (nargs == 2) return Py_NewRef(args[1]);
    PyErr_SetObject(PyExc_KeyError, args[0]);
    return NULL;
}

static PyObject *dm_clear_method(DigestMap *m, PyObject *unused) {
    (void)unused;
    dm_clear(m);
    Py_RETURN_NONE;
}

/* A list of the keys (0), values (1) or (key, value) pairs (2). */
static PyObject *dm_list(DigestMap *m, int what) {
    PyObject *out = PyList_New(0);
    for (size_t i = 0; out && m->t && i <= m->mask; i++) {
        dm_slot s = m->t[i];
        if (!s.v) continue;
        char d[16];
        memcpy(d, &s.a, 8);
        memcpy(d + 8, &s.b, 8);
        PyObject *k = what == 1 ? NULL : PyBytes_FromStringAndSize(d, 16);
        PyObject *item = what == 0 ? k : what == 1 ? Py_NewRef(s.v) : k ? PyTuple_Pack(2, k, s.v) : NULL;
        if (what == 2) Py_XDECREF(k);
        if (append_new(out, item)) Py_CLEAR(out);
    }
    if (out && m->other) {
        PyObject *rest = what == 0 ? PyDict_Keys(m->other) : what == 1 ? PyDict_Values(m->other) : PyDict_Items(m->other);
        Py_ssize_t end = PyList_GET_SIZE(out);
        if (!rest || PyList_SetSlice(out, end, end, rest)) Py_CLEAR(out);
        Py_XDECREF(rest);
    }
    return out;
}

static PyObject *dm_keys(DigestMap *m, PyObject *unused) { (void)unused; return dm_list(m, 0); }
static PyObject *dm_values(DigestMap *m, PyObject *unused) { (void)unused; return dm_list(m, 1); }
static PyObject *dm_items(DigestMap *m, PyObject *unused) { (void)unused; return dm_list(m, 2); }

static PyObject *dm_iter(DigestMap *m) {
    PyObject *keys = dm_list(m, 0);
    PyObject *it = keys ? PyObject_GetIter(keys) : NULL;
    Py_XDECREF(keys);
    return it;
}

static PyMethodDef dm_methods[] = {
    {"get", (PyCFunction)(void (*)(void))dm_get_method, METH_FASTCALL, "The value of a key, or the default."},
    {"pop", (PyCFunction)(void (*)(void))dm_pop, METH_FASTCALL, "Take a key out; its value, or the default."},
    {"clear", (PyCFunction)dm_clear_method, METH_NOARGS, "Take every key out."},
    {"keys", (PyCFunction)dm_keys, METH_NOARGS, "A list of the keys."},
    {"values", (PyCFunction)dm_values, METH_NOARGS, "A list of the values."},
    {"items", (PyCFunction)dm_items, METH_NOARGS, "A list of the (key, value) pairs."},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods dm_as_mapping = {(lenfunc)dm_length, (binaryfunc)dm_subscript,
                                         (objobjargproc)dm_ass_subscript};
static PySequenceMethods dm_as_sequence = {.sq_contains = (objobjproc)dm_contains};

static PyTypeObject DigestMapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "detectord.ingest._fastdecode.DigestMap",
    .tp_basicsize = sizeof(DigestMap),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A dict from 16-byte label digests to what they mean (the label cache's generations).",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)dm_dealloc,
    .tp_traverse = (traverseproc)dm_traverse,
    .tp_clear = (inquiry)dm_clear,
    .tp_as_mapping = &dm_as_mapping,
    .tp_as_sequence = &dm_as_sequence,
    .tp_iter = (getiterfunc)dm_iter,
    .tp_methods = dm_methods,
};

/* How raw label fields become a series key: the cache, and on a miss enter_key() or resolve() (see
 * decode_v1), with what enter_key made. */
typedef struct {
    PyObject *cache, *resolve, *shared;
    Py_ssize_t max_labels, max_name, max_value;
    PyObject *old, *pinned, *keys, *old_keys; /* NULL: enter_key enters nothing */
    PyObject *made_out;                       /* where store_made puts the next four */
    Py_ssize_t made, made_labels, made_chars, entered;
} keyer;

/* remote_write.SeriesKey (set by key_type) and the names of its slots. */
static PyTypeObject *series_key;
static PyObject *labels_name, *name_name, *state_name, *metric_label, *empty_name;

/* The characters of a label set's names and values (the label cache's size estimate), or -1 with
 * TypeError when it is not a tuple of (name, value) pairs of str. */
static Py_ssize_t chars_of(PyObject *labels) {
    if (!PyTuple_Check(labels)) goto bad;
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(labels); i++) {
        PyObject *pair = PyTuple_GET_ITEM(labels, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyUnicode_Check(PyTuple_GET_ITEM(pair, 0)) ||
            !PyUnicode_Check(PyTuple_GET_ITEM(pair, 1)))
            goto bad;
        total += PyUnicode_GET_LENGTH(PyTuple_GET_ITEM(pair, 0)) + PyUnicode_GET_LENGTH(PyTuple_GET_ITEM(pair, 1));
    }
    return total;
bad:
    PyErr_SetString(PyExc_TypeError, "labels must be a tuple of (name, value) pairs");
    return -1;
}

/* The key the cache's pinned or young keys hold for labels (borrowed), or NULL (with an error set
 * on failure). */
static PyObject *held_key(PyObject *pinned, PyObject *keys, PyObject *labels) {
    PyObject *known = PyDict_GetItemWithError(pinned, labels);
    return known || PyErr_Occurred() ? known : PyDict_GetItemWithError(keys, labels);
}

/* A new SeriesKey of labels (a valid set of the cache's shared pairs), as SeriesKey(labels)
 * makes it, entered in keys. NULL on error. */
static PyObject *make_key(PyObject *keys, PyObject *labels) {
    PyObject *name = empty_name;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(labels); i++) {
        PyObject *pair = PyTuple_GET_ITEM(labels, i);
        if (PyUnicode_Compare(PyTuple_GET_ITEM(pair, 0), metric_label) == 0) {
            name = PyTuple_GET_ITEM(pair, 1);
            break;
        }
    }
    PyObject *key = series_key->tp_alloc(series_key, 0);
    if (key && (PyObject_SetAttr(key, labels_name, labels) || PyObject_SetAttr(key, name_name, name) ||
                PyObject_SetAttr(key, state_name, Py_None) || PyDict_SetItem(keys, labels, key)))
        Py_CLEAR(key);
    return key;
}

/* The key of a plainly valid label set (from checked_labels) whose digest (a, b) the cache does not
 * hold, entered in the cache's tables as LabelCache.from_label_fields(digest, labels, True) would
 * enter it: the key pinned or keys holds for the labels (counted in k->entered), else a new
 * SeriesKey (counted in k->made*). NULL without an error where old holds the digest or old_keys the labels
 * (from_label_fields moves them), NULL with one on failure. */
static PyObject *enter_key(keyer *k, uint64_t a, uint64_t b, PyObject *labels) {
    if (!k->old || !series_key) return NULL;
    if (dm_get((DigestMap *)k->old, a, b)) return NULL;
    PyObject *key = held_key(k->pinned, k->keys, labels);
    if (key) {
        if (dm_set((DigestMap *)k->cache, a, b, key)) return NULL;
        k->entered++;
        return Py_NewRef(key);
    }
    if (PyErr_Occurred() || PyDict_Contains(k->old_keys, labels)) return NULL;
    if (!(key = make_key(k->keys, labels))) return NULL;
    if (dm_set((DigestMap *)k->cache, a, b, key)) {
        Py_DECREF(key);
        return NULL;
    }
    k->made++;
    k->made_labels += PyTuple_GET_SIZE(labels);
    k->made_chars += chars_of(labels); /* checked_labels' pairs: never -1 */
    return key;
}

/* The digest of raw label fields, as two words. */
static void label_digest(const uint8_t *rp, const uint8_t *rend, uint64_t *a, uint64_t *b) {
    uint8_t d[16];
    siphash128(rp, (size_t)(rend - rp), sip_k0, sip_k1, d);
    memcpy(a, d, 8);
    memcpy(b, d + 8, 8);
}

/* Where the cache would look for digest (a, b) first: fetched ahead of the lookup. */
static void prefetch_digest(const keyer *k, uint64_t a) {
    const DigestMap *m = (const DigestMap *)k->cache;
    if (m->t) __builtin_prefetch(&m->t[(size_t)a & m->mask]);
}

/* The SeriesKey or reason (str) for the raw label fields rp..rend, whose digest is (a, b); a new
 * reference, NULL on error. */
static PyObject *lookup_digest(keyer *k, const uint8_t *rp, const uint8_t *rend, uint64_t a, uint64_t b) {
    uint8_t d[16];
    memcpy(d, &a, 8);
    memcpy(d + 8, &b, 8);
    PyObject *key = dm_get((DigestMap *)k->cache, a, b);
    if (key) return Py_NewRef(key);
    PyObject *digest = PyBytes_FromStringAndSize((const char *)d, 16);
    if (!digest) return NULL;
    PyObject *labels = Py_None;
    Py_INCREF(labels);
    if (k->shared != Py_None) {
        Py_DECREF(labels);
        labels = checked_labels(rp, rend, k->shared, k->max_labels, k->max_name, k->max_value);
        if (!labels) {
            Py_DECREF(digest);
            return NULL;
        }
    }
    if (labels != Py_None) {
        key = enter_key(k, a, b, labels);
        if (!key && !PyErr_Occurred()) key = PyObject_CallFunctionObjArgs(k->resolve, digest, labels, Py_True, NULL);
    } else {
        PyObject *pairs = label_pairs(rp, rend);
        key = pairs ? PyObject_CallFunctionObjArgs(k->resolve, digest, pairs, NULL) : NULL;
        Py_XDECREF(pairs);
    }
    Py_DECREF(labels);
    Py_DECREF(digest);
    return key;
}

/* siphash128(data, key) -> the 16-byte digest under a 16-byte key (for tests). */
static PyObject *py_siphash128(PyObject *self, PyObject *args) {
    Py_buffer data, key;
    if (!PyArg_ParseTuple(args, "y*y*", &data, &key)) return NULL;
    PyObject *out = NULL;
    if (key.len != 16) {
        PyErr_SetString(PyExc_ValueError, "key must be 16 bytes");
    } else {
        uint64_t k0, k1;
        uint8_t d[16];
        memcpy(&k0, key.buf, 8);
        memcpy(&k1, (const uint8_t *)key.buf + 8, 8);
        siphash128((const uint8_t *)data.buf, (size_t)data.len, k0, k1, d);
        out = PyBytes_FromStringAndSize((const char *)d, 16);
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&key);
    return out;
}

/* The arguments both decoders share: keep (None or a tuple of metric names as bytes, compared in
 * place: a handful, cheaper than making a bytes object to look up), shared, tables, start. 0, or
 * -1 with an exception set. */
static int check_args(PyObject *keep, PyObject *shared, PyObject *tables, Py_ssize_t start, Py_ssize_t len,
                      PyObject ***keep_names, Py_ssize_t *nkeep) {
    *keep_names = NULL;
    *nkeep = -1;
    if (shared != Py_None && !PyDict_Check(shared)) {
        PyErr_SetString(PyExc_TypeError, "shared must be a dict or None");
        return -1;
    }
    int ok = tables == Py_None || (PyTuple_Check(tables) && PyTuple_GET_SIZE(tables) == 5 &&
                                   Py_IS_TYPE(PyTuple_GET_ITEM(tables, 0), &DigestMapType));
    for (Py_ssize_t k = 1; ok && tables != Py_None && k < 4; k++) ok = PyDict_Check(PyTuple_GET_ITEM(tables, k));
    if (ok && tables != Py_None) {
        PyObject *made = PyTuple_GET_ITEM(tables, 4);
        ok = PyList_CheckExact(made) && PyList_GET_SIZE(made) == 4;
    }
    if (!ok) {
        PyErr_SetString(PyExc_TypeError, "tables must be a DigestMap, three dicts and a list of four, or None");
        return -1;
    }
    if (keep != Py_None) {
        int ok = PyTuple_Check(keep);
        for (Py_ssize_t k = 0; ok && k < PyTuple_GET_SIZE(keep); k++) ok = PyBytes_Check(PyTuple_GET_ITEM(keep, k));
        if (!ok) {
            PyErr_SetString(PyExc_TypeError, "keep must be a tuple of metric names as bytes, or None");
            return -1;
        }
        *nkeep = PyTuple_GET_SIZE(keep);
        *keep_names = &PyTuple_GET_ITEM(keep, 0);
    }
    if (start < 0 || start > len) {
        PyErr_SetString(PyExc_ValueError, "start out of range");
        return -1;
    }
    return 0;
}

/* The label cache's tables enter_key enters keys in (checked by check_args), if given. */
static void key_tables(keyer *k, PyObject *tables) {
    k->old = k->pinned = k->keys = k->old_keys = k->made_out = NULL;
    k->made = k->made_labels = k->made_chars = k->entered = 0;
    if (tables == Py_None) return;
    k->old = PyTuple_GET_ITEM(tables, 0);
    k->pinned = PyTuple_GET_ITEM(tables, 1);
    k->keys = PyTuple_GET_ITEM(tables, 2);
    k->old_keys = PyTuple_GET_ITEM(tables, 3);
    k->made_out = PyTuple_GET_ITEM(tables, 4);
}

/* Puts what enter_key made in the tables' list, whether decoding succeeded or not: the cache counts
 * every key it holds. 0, or -1 with an exception set. */
static int store_made(const keyer *k) {
    if (!k->old) return 0;
    Py_ssize_t counts[4] = {k->made, k->made_labels, k->made_chars, k->entered};
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    for (int i = 0; i < 4; i++) {
        PyObject *n = PyLong_FromSsize_t(counts[i]);
        if (!n || PyList_SetItem(k->made_out, i, n)) {
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
            return -1;
        }
    }
    PyErr_Restore(type, value, tb);
    return 0;
}

static int kept(PyObject **keep_names, Py_ssize_t nkeep, const uint8_t *name, Py_ssize_t len) {
    for (Py_ssize_t k = 0; k < nkeep; k++)
        if (PyBytes_GET_SIZE(keep_names[k]) == len && memcmp(PyBytes_AS_STRING(keep_names[k]), name, (size_t)len) == 0)
            return 1;
    return 0;
}

static PyObject *zero;            /* 0.0, shared by every zero sample */
static PyObject *recent_ts[1024]; /* timestamps made lately, by a hash of their value */
static int64_t recent_val[1024];  /* their values, compared without reading the int back */

/* The int of timestamp ts: one made lately for the same value if there is one. A target's series
 * all carry its scrape's timestamp and keep their last, so a tracked instance holds one int, not
 * one per series (requests interleave targets: hence a table, not the previous sample's). The GIL
 * is held and no Python code runs in between, so the table needs no lock. */
static PyObject *timestamp(int64_t ts) {
    size_t i = (size_t)(((uint64_t)ts * 0x9E3779B97F4A7C15ULL) >> 54);
    if (recent_ts[i] && recent_val[i] == ts) return Py_NewRef(recent_ts[i]);
    PyObject *made = PyLong_FromLongLong(ts);
    if (made) {
        Py_XSETREF(recent_ts[i], Py_NewRef(made));
        recent_val[i] = ts;
    }
    return made;
}

/* An accepted series: its key, its number of samples and its samples onto the flat lists. */
static int accept(PyObject *keys, PyObject *counts, PyObject *tss, PyObject *vals, PyObject *key, const samplebuf *sb) {
    int rc = PyList_Append(keys, key);
    if (!rc) rc = append_new(counts, PyLong_FromSsize_t(sb->n));
    for (Py_ssize_t i = 0; i < sb->n && !rc; i++) {
        rc = append_new(tss, timestamp(sb->ts[i]));
        if (rc) break;
        double v = sb->val[i];
        if (v == 0.0 && !signbit(v))
            rc = PyList_Append(vals, zero);
        else
            rc = append_new(vals, PyFloat_FromDouble(v));
    }
    return rc;
}

static PyObject *reject(PyObject *rejects, PyObject *key, Py_ssize_t n, const char *why, PyObject *detail) {
    PyObject *item = Py_BuildValue("(OnsO)", key, n, why, detail ? detail : Py_None);
    if (!item) return NULL;
    int rc = PyList_Append(rejects, item);
    Py_DECREF(item);
    return rc ? NULL : Py_None;
}

/* A series the decoder has parsed and not yet looked up. It hashes a series' labels and fetches the
 * label cache's slot for the digest as soon as it has parsed the series, and looks it up LOOKAHEAD
 * series later: a fleet's cache is far bigger than the CPU's caches, and waiting for the slot was
 * the largest single wait of the ingest thread. */
typedef struct {
    uint64_t a, b;
    const uint8_t *rp, *rend; /* its label fields: in the body, or gathered in `own` */
    char *own;
    size_t own_cap;
    samplebuf sb;
    Py_ssize_t hist, ex;
    PyObject *hists;
} pending;

#define LOOKAHEAD 8
#define RING (LOOKAHEAD + 1)

/* Where decoded series go, and what is counted of them. */
typedef struct {
    keyer *kr;
    int v2;
    PyObject *check_hist, *rejects, *keys, *counts, *tss, *vals;
    long long max_ts;
    Py_ssize_t n_hist, n_ex;
    pending ring[RING];
    int head, queued; /* the oldest queued series, and how many */
} taker;

static int sort_samples(samplebuf *sb);

static int samples_sorted(const samplebuf *sb) {
    for (Py_ssize_t i = 1; i < sb->n; i++)
        if (sb->ts[i - 1] > sb->ts[i]) return 0;
    return 1;
}

/* Looks a parsed series up and takes or refuses it: the same checks in the same order as
 * remote_write._v1_python_steps and _v2_python_steps. */
static int take_series(taker *t, pending *s) {
    PyObject *key = lookup_digest(t->kr, s->rp, s->rend, s->a, s->b);
    if (!key) return -1;
    samplebuf *sb = &s->sb;
    Py_ssize_t n = sb->n;
    int rc = 0;
    PyObject *problem = NULL;
    if (PyUnicode_Check(key)) {
        rc = reject(t->rejects, key, n, "labels", NULL) ? 0 : -1;
    } else if (t->v2 && n > 0 && s->hist > 0) {
        rc = reject(t->rejects, key, n, "both", NULL) ? 0 : -1;
    } else if (s->hist && !(problem = PyObject_CallFunctionObjArgs(t->check_hist, s->hists, NULL))) {
        rc = -1;
    } else if (problem && problem != Py_None) {
        rc = reject(t->rejects, key, n, "histogram", problem) ? 0 : -1;
    } else if (n == 0 && s->hist == 0) {
        rc = reject(t->rejects, key, 0, "no_samples", NULL) ? 0 : -1;
    } else if (n == 0) {
        t->n_hist += s->hist;
        t->n_ex += s->ex;
    } else if (t->v2 && !samples_sorted(sb) && sort_samples(sb)) { /* 2.0's sorted; 1.0's kept as sent */
        PyErr_NoMemory();
        rc = -1;
    } else if (sb->latest > t->max_ts) {
        rc = reject(t->rejects, key, n, "future", NULL) ? 0 : -1;
    } else {
        t->n_hist += s->hist;
        t->n_ex += s->ex;
        rc = accept(t->keys, t->counts, t->tss, t->vals, key, sb);
    }
    Py_XDECREF(problem);
    Py_DECREF(key);
    Py_CLEAR(s->hists);
    return rc;
}

/* The next series' record, emptied (it is not queued until `queue`). */
static pending *next_record(taker *t) {
    pending *s = &t->ring[(t->head + t->queued) % RING];
    s->sb.n = 0;
    s->sb.latest = INT64_MIN;
    s->hist = s->ex = 0;
    Py_CLEAR(s->hists);
    return s;
}

/* Takes the queued series, oldest first. */
static int take_queued(taker *t) {
    for (; t->queued > 0; t->queued--, t->head = (t->head + 1) % RING)
        if (take_series(t, &t->ring[t->head])) return -1;
    return 0;
}

/* Queues the series in the next record (its labels at rp..rend), taking the oldest if the queue
 * is full. */
static int queue(taker *t, pending *s) {
    label_digest(s->rp, s->rend, &s->a, &s->b);
    prefetch_digest(t->kr, s->a);
    if (++t->queued < RING) return 0;
    t->queued--;
    int rc = take_series(t, &t->ring[t->head]);
    t->head = (t->head + 1) % RING;
    return rc;
}

static void let_go_ring(taker *t) {
    for (int i = 0; i < RING; i++) {
        Py_XDECREF(t->ring[i].hists);
        PyMem_Free(t->ring[i].own);
        PyMem_Free(t->ring[i].sb.ts);
        PyMem_Free(t->ring[i].sb.val);
    }
}

static PyObject *decode_v1(PyObject *self, PyObject *args) {
    Py_buffer buf;
    PyObject *cache, *resolve, *check_hist, *keys, *counts, *tss, *vals, *keep, *shared, *tables;
    long long max_ts;
    Py_ssize_t start, max_series, max_labels, max_name, max_value;
    if (!PyArg_ParseTuple(args, "y*O!OOLnnO!O!O!O!OOnnnO", &buf, &DigestMapType, &cache, &resolve, &check_hist,
                          &max_ts, &start, &max_series, &PyList_Type, &keys, &PyList_Type, &counts, &PyList_Type,
                          &tss, &PyList_Type, &vals, &keep, &shared, &max_labels, &max_name, &max_value, &tables))
        return NULL;
    PyObject **keep_names;
    Py_ssize_t nkeep;
    if (check_args(keep, shared, tables, start, buf.len, &keep_names, &nkeep)) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    keyer kr = {cache, resolve, shared, max_labels, max_name, max_value};
    key_tables(&kr, tables);
    PyObject *rejects = PyList_New(0);
    PyObject *result = NULL;
    taker tk = {&kr, 0, check_hist, rejects, keys, counts, tss, vals, max_ts};
    Py_ssize_t n_samples = 0, n_meta = 0, n_ignored = 0;
    const char *err = NULL;
    if (!rejects) goto fail;

    cursor c = {(const uint8_t *)buf.buf + start, (const uint8_t *)buf.buf + buf.len};
    Py_ssize_t done = 0;
    while (c.p < c.end && done < max_series) {
        uint32_t field;
        unsigned wt;
        if (read_tag(&c, &field, &wt)) { err = "malformed tag"; goto fail; }
        if (field == 3 && wt == 2) {
            cursor skip;
            if (read_len(&c, &skip)) { err = "truncated metadata"; goto fail; }
            n_meta++;
            continue;
        }
        if (field != 1 || wt != 2) {
            if (skip_field(&c, field, wt, MAX_DEPTH)) { err = "malformed field"; goto fail; }
            continue;
        }
        cursor ts;
        if (read_len(&c, &ts)) { err = "truncated timeseries"; goto fail; }
        done++;

        /* Label fields, usually one contiguous run at the start of the message. */
        const uint8_t *lab_start = NULL, *lab_end = NULL;
        int contiguous = 1;
        size_t lab_bytes = 0;
        int name_state = 0;
        cursor mname = {NULL, NULL};
        pending *cur = next_record(&tk);
        samplebuf *sb = &cur->sb;
        while (ts.p < ts.end) {
            const uint8_t *field_start = ts.p;
            uint32_t f2;
            unsigned w2;
            if (read_tag(&ts, &f2, &w2)) { err = "malformed series tag"; goto fail; }
            cursor sub;
            if (f2 == 1 && w2 == 2) {
                if (read_len(&ts, &sub)) { err = "truncated label"; goto fail; }
                if (lab_start == NULL) lab_start = field_start;
                else if (lab_end != field_start) contiguous = 0;
                lab_end = ts.p;
                lab_bytes += (size_t)(ts.p - field_start);
                if (nkeep >= 0 && name_state >= 0) name_state = name_step(sub, name_state, &mname);
            } else if (f2 == 2 && w2 == 2) {
                if (read_len(&ts, &sub)) { err = "truncated sample"; goto fail; }
                int rc = parse_sample(sub, sb);
                if (rc == -1) { err = "malformed sample"; goto fail; }
                if (rc == -2) { PyErr_NoMemory(); goto fail; }
            } else if (f2 == 3 && w2 == 2) {
                if (read_len(&ts, &sub)) { err = "truncated exemplar"; goto fail; }
                cur->ex++;
            } else if (f2 == 4 && w2 == 2) {
                if (read_len(&ts, &sub)) { err = "truncated histogram"; goto fail; }
                if (!cur->hists && !(cur->hists = PyList_New(0))) goto fail;
                if (append_new(cur->hists, PyBytes_FromStringAndSize((const char *)sub.p, sub.end - sub.p))) goto fail;
                cur->hist++;
            } else if (skip_field(&ts, f2, w2, MAX_DEPTH - 1)) {
                err = "malformed series field"; goto fail;
            }
        }
        n_samples += sb->n;

        if (nkeep >= 0 && name_state == 1 && cur->hist == 0 && mname.end > mname.p) {
            if (!kept(keep_names, nkeep, mname.p, mname.end - mname.p)) {
                /* A metric nothing reads: counted, and nothing else (no key, no cache entry). */
                n_ignored += sb->n;
                tk.n_ex += cur->ex;
                continue;
            }
        }

        cur->rp = cur->rend = (const uint8_t *)"";
        if (lab_start != NULL && contiguous) {
            cur->rp = (const uint8_t *)lab_start;
            cur->rend = (const uint8_t *)lab_end;
        } else if (lab_start != NULL) {
            /* Labels interleaved with other fields: gather them (rare; never from Prometheus). */
            if (cur->own_cap < lab_bytes) {
                char *grown = PyMem_Realloc(cur->own, lab_bytes);
                if (!grown) { PyErr_NoMemory(); goto fail; }
                cur->own = grown;
                cur->own_cap = lab_bytes;
            }
            size_t off = 0;
            cursor re = {(const uint8_t *)lab_start, ts.end};
            while (re.p < re.end) {
                const uint8_t *fs = re.p;
                uint32_t f3;
                unsigned w3;
                cursor lab;
                read_tag(&re, &f3, &w3); /* already checked above */
                if (f3 == 1 && w3 == 2) {
                    read_len(&re, &lab);
                    memcpy(cur->own + off, fs, (size_t)(re.p - fs));
                    off += (size_t)(re.p - fs);
                } else {
                    skip_field(&re, f3, w3, MAX_DEPTH - 1);
                }
            }
            cur->rp = (const uint8_t *)cur->own;
            cur->rend = cur->rp + off;
        }
        if (queue(&tk, cur)) goto fail;
    }
    if (take_queued(&tk)) goto fail;
    Py_ssize_t next = (Py_ssize_t)(c.p - (const uint8_t *)buf.buf);
    result = Py_BuildValue("(nnnnOnn)", n_samples, tk.n_hist, tk.n_ex, n_meta, rejects, next, n_ignored);

fail:
    /* A malformed series refuses the whole request; the series before it are looked up all the
     * same (keys and cache entries made), wherever the lookahead was. */
    if (err && !PyErr_Occurred()) take_queued(&tk);
    if (store_made(&kr)) Py_CLEAR(result);
    let_go_ring(&tk);
    PyBuffer_Release(&buf);
    Py_XDECREF(rejects);
    if (!result && err && !PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, err);
    return result;
}

/* ---- remote write 2.0 ---- */

/* Where each of a 2.0 Request's symbols is: (offset, length) pairs as int64, packed in a bytes
 * object for decode_v2. The message is valid (protobuf parsed it first), so this only finds. */
static PyObject *symbols_v2(PyObject *self, PyObject *args) {
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "y*", &buf)) return NULL;
    const uint8_t *base = (const uint8_t *)buf.buf;
    cursor c = {base, base + buf.len};
    int64_t *tab = NULL;
    Py_ssize_t n = 0, cap = 0;
    int bad = 0;
    while (c.p < c.end) {
        uint32_t field;
        unsigned wt;
        cursor sub;
        if (read_tag(&c, &field, &wt)) { bad = 1; break; }
        if (field == 4 && wt == 2) {
            if (read_len(&c, &sub)) { bad = 1; break; }
            if (n == cap) {
                cap = cap ? cap * 2 : 64;
                int64_t *grown = PyMem_Realloc(tab, (size_t)cap * 2 * sizeof(int64_t));
                if (!grown) {
                    PyMem_Free(tab);
                    PyBuffer_Release(&buf);
                    return PyErr_NoMemory();
                }
                tab = grown;
            }
            tab[2 * n] = sub.p - base;
            tab[2 * n + 1] = sub.end - sub.p;
            n++;
        } else if (skip_field(&c, field, wt, MAX_DEPTH)) {
            bad = 1;
            break;
        }
    }
    PyBuffer_Release(&buf);
    if (bad) {
        PyMem_Free(tab);
        PyErr_SetString(PyExc_ValueError, "malformed top-level field");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize((const char *)tab, (Py_ssize_t)(n * 2 * sizeof(int64_t)));
    PyMem_Free(tab);
    return out;
}

typedef struct {
    uint32_t *v;
    Py_ssize_t n, cap;
} refbuf;

static int push_ref(refbuf *r, uint64_t v) {
    if (r->n == r->cap) {
        Py_ssize_t cap = r->cap ? r->cap * 2 : 32;
        uint32_t *grown = PyMem_Realloc(r->v, (size_t)cap * sizeof(uint32_t));
        if (!grown) return -1;
        r->v = grown;
        r->cap = cap;
    }
    r->v[r->n++] = (uint32_t)v; /* uint32: protobuf keeps the low 32 bits */
    return 0;
}

/* Sorts n samples by timestamp, keeping the order of equal ones (as Python's sort does). */
static int sort_samples(samplebuf *sb) {
    Py_ssize_t n = sb->n;
    int64_t *t2 = PyMem_Malloc((size_t)n * sizeof(int64_t));
    double *v2 = PyMem_Malloc((size_t)n * sizeof(double));
    if (!t2 || !v2) {
        PyMem_Free(t2);
        PyMem_Free(v2);
        return -1;
    }
    int64_t *ts = sb->ts, *tt = t2;
    double *vs = sb->val, *vt = v2;
    for (Py_ssize_t width = 1; width < n; width *= 2) {
        for (Py_ssize_t lo = 0; lo < n; lo += 2 * width) {
            Py_ssize_t mid = lo + width < n ? lo + width : n, hi = lo + 2 * width < n ? lo + 2 * width : n;
            Py_ssize_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi) {
                if (ts[j] < ts[i]) { tt[k] = ts[j]; vt[k++] = vs[j++]; }
                else { tt[k] = ts[i]; vt[k++] = vs[i++]; }
            }
            while (i < mid) { tt[k] = ts[i]; vt[k++] = vs[i++]; }
            while (j < hi) { tt[k] = ts[j]; vt[k++] = vs[j++]; }
        }
        int64_t *st = ts; ts = tt; tt = st;
        double *sv = vs; vs = vt; vt = sv;
    }
    if (ts != sb->ts) {
        memcpy(sb->ts, ts, (size_t)n * sizeof(int64_t));
        memcpy(sb->val, vs, (size_t)n * sizeof(double));
    }
    PyMem_Free(t2);
    PyMem_Free(v2);
    return 0;
}

/* Appends one label as a 1.0 Label field (tag, length, name field, value field) to a growing
 * buffer: a 2.0 series' labels become the bytes a 1.0 series with them in that order has, so
 * both versions share the cache and its checks. */
static int put_varint(uint8_t *p, uint64_t v) {
    int n = 0;
    while (v >= 0x80) {
        p[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (uint8_t)v;
    return n;
}

static int put_label(char **buf, size_t *cap, size_t *off, const uint8_t *name, size_t nlen, const uint8_t *value,
                     size_t vlen) {
    uint8_t hdr[11];
    int nh = put_varint(hdr, nlen), vh = put_varint(hdr, vlen);
    size_t body = 1 + (size_t)nh + nlen + 1 + (size_t)vh + vlen;
    size_t need = *off + 1 + 10 + body;
    if (need > *cap) {
        size_t grown_cap = *cap ? *cap : 256;
        while (grown_cap < need) grown_cap *= 2;
        char *grown = PyMem_Realloc(*buf, grown_cap);
        if (!grown) return -1;
        *buf = grown;
        *cap = grown_cap;
    }
    uint8_t *p = (uint8_t *)*buf + *off;
    *p++ = 0x0a;
    p += put_varint(p, body);
    *p++ = 0x0a;
    p += put_varint(p, nlen);
    memcpy(p, name, nlen);
    p += nlen;
    *p++ = 0x12;
    p += put_varint(p, vlen);
    memcpy(p, value, vlen);
    p += vlen;
    *off = (size_t)(p - (uint8_t *)*buf);
    return 0;
}

/*
 * decode_v2(data, symtab, cache, resolve, check_hist, max_ts, start, max_series, keys, counts,
 *           timestamps, values, keep, shared, max_labels, max_name, max_value)
 *     -> (samples, histograms, exemplars, metadata, rejects, next, ignored)
 * decode_v1 for a 2.0 Request that protobuf has already parsed (so it is valid: this walks it
 * and need not judge its wire format), with symtab from symbols_v2. The checks, in the order of
 * remote_write._v2_steps: labels_refs of odd length (why "refs_odd") or beyond the symbols
 * ("refs_range", detail (largest ref, symbols)), a metric `keep` does not name (ignored), the
 * labels (as 1.0 label bytes through the cache: "labels"), samples and histograms both ("both"),
 * a histogram check_hist refuses ("histogram"), neither ("no_samples"), samples (sorted by
 * time) beyond max_ts ("future"). check_hist gets the series' raw 2.0 Histogram messages.
 */
static PyObject *decode_v2(PyObject *self, PyObject *args) {
    Py_buffer buf, symbuf;
    PyObject *cache, *resolve, *check_hist, *keys, *counts, *tss, *vals, *keep, *shared, *tables;
    long long max_ts;
    Py_ssize_t start, max_series, max_labels, max_name, max_value;
    if (!PyArg_ParseTuple(args, "y*y*O!OOLnnO!O!O!O!OOnnnO", &buf, &symbuf, &DigestMapType, &cache, &resolve,
                          &check_hist, &max_ts, &start, &max_series, &PyList_Type, &keys, &PyList_Type, &counts,
                          &PyList_Type, &tss, &PyList_Type, &vals, &keep, &shared, &max_labels, &max_name,
                          &max_value, &tables))
        return NULL;
    PyObject **keep_names;
    Py_ssize_t nkeep;
    if (check_args(keep, shared, tables, start, buf.len, &keep_names, &nkeep)) {
        PyBuffer_Release(&buf);
        PyBuffer_Release(&symbuf);
        return NULL;
    }
    keyer kr = {cache, resolve, shared, max_labels, max_name, max_value};
    key_tables(&kr, tables);
    const uint8_t *base = (const uint8_t *)buf.buf;
    const int64_t *sym = (const int64_t *)symbuf.buf;
    Py_ssize_t nsym = symbuf.len / (Py_ssize_t)(2 * sizeof(int64_t));

    PyObject *rejects = PyList_New(0);
    PyObject *result = NULL;
    taker tk = {&kr, 1, check_hist, rejects, keys, counts, tss, vals, max_ts};
    Py_ssize_t n_samples = 0, n_meta = 0, n_ignored = 0;
    refbuf refs = {NULL, 0, 0};
    const char *err = NULL;
    if (!rejects) goto fail;

    cursor c = {base + start, base + buf.len};
    Py_ssize_t done = 0;
    while (c.p < c.end && done < max_series) {
        uint32_t field;
        unsigned wt;
        if (read_tag(&c, &field, &wt)) { err = "malformed tag"; goto fail; }
        if (field != 5 || wt != 2) {
            if (skip_field(&c, field, wt, MAX_DEPTH)) { err = "malformed field"; goto fail; }
            continue;
        }
        cursor ts;
        if (read_len(&c, &ts)) { err = "truncated timeseries"; goto fail; }
        done++;
        int meta = 0;
        pending *cur = next_record(&tk);
        samplebuf *sb = &cur->sb;
        refs.n = 0;
        while (ts.p < ts.end) {
            uint32_t f2;
            unsigned w2;
            cursor sub;
            uint64_t v;
            if (read_tag(&ts, &f2, &w2)) { err = "malformed series tag"; goto fail; }
            if (f2 == 1 && w2 == 0) {
                if (read_varint(&ts, &v)) { err = "malformed labels_refs"; goto fail; }
                if (push_ref(&refs, v)) { PyErr_NoMemory(); goto fail; }
            } else if (f2 == 1 && w2 == 2) {
                if (read_len(&ts, &sub)) { err = "truncated labels_refs"; goto fail; }
                while (sub.p < sub.end) {
                    if (read_varint(&sub, &v)) { err = "malformed labels_refs"; goto fail; }
                    if (push_ref(&refs, v)) { PyErr_NoMemory(); goto fail; }
                }
            } else if (f2 == 2 && w2 == 2) {
                if (read_len(&ts, &sub)) { err = "truncated sample"; goto fail; }
                int rc = parse_sample(sub, sb);
                if (rc == -1) { err = "malformed sample"; goto fail; }
                if (rc == -2) { PyErr_NoMemory(); goto fail; }
            } else if (f2 == 3 && w2 == 2) {
                if (read_len(&ts, &sub)) { err = "truncated histogram"; goto fail; }
                if (!cur->hists && !(cur->hists = PyList_New(0))) goto fail;
                if (append_new(cur->hists, PyBytes_FromStringAndSize((const char *)sub.p, sub.end - sub.p))) goto fail;
                cur->hist++;
            } else if (f2 == 4 && w2 == 2) {
                if (read_len(&ts, &sub)) { err = "truncated exemplar"; goto fail; }
                cur->ex++;
            } else if (f2 == 5 && w2 == 2) {
                if (read_len(&ts, &sub)) { err = "truncated metadata"; goto fail; }
                meta = 1;
            } else if (skip_field(&ts, f2, w2, MAX_DEPTH - 1)) {
                err = "malformed series field"; goto fail;
            }
        }
        Py_ssize_t n = sb->n;
        n_samples += n;
        n_meta += meta;

        /* Refused before any lookup: the queued series first, so refusals stay in order. */
        if (refs.n % 2) {
            if (take_queued(&tk) || !reject(rejects, Py_None, n, "refs_odd", NULL)) goto fail;
            continue;
        }
        uint32_t top = 0;
        for (Py_ssize_t i = 0; i < refs.n; i++)
            if (refs.v[i] > top) top = refs.v[i];
        if (refs.n && (Py_ssize_t)top >= nsym) {
            if (take_queued(&tk)) goto fail;
            PyObject *detail = Py_BuildValue("(kn)", (unsigned long)top, nsym);
            PyObject *ok = detail ? reject(rejects, Py_None, n, "refs_range", detail) : NULL;
            Py_XDECREF(detail);
            if (!ok) goto fail;
            continue;
        }
        if (nkeep >= 0 && cur->hist == 0) {
            Py_ssize_t names = 0;
            const uint8_t *mp = NULL;
            Py_ssize_t mlen = 0;
            for (Py_ssize_t i = 0; i < refs.n; i += 2) {
                const int64_t *ns = sym + 2 * refs.v[i];
                if (ns[1] == 8 && memcmp(base + ns[0], "__name__", 8) == 0) {
                    const int64_t *vs = sym + 2 * refs.v[i + 1];
                    names++;
                    mp = base + vs[0];
                    mlen = (Py_ssize_t)vs[1];
                }
            }
            if (names == 1 && mlen > 0 && !kept(keep_names, nkeep, mp, mlen)) {
                n_ignored += n;
                tk.n_ex += cur->ex;
                continue;
            }
        }
        size_t off = 0;
        for (Py_ssize_t i = 0; i < refs.n; i += 2) {
            const int64_t *ns = sym + 2 * refs.v[i], *vs = sym + 2 * refs.v[i + 1];
            if (put_label(&cur->own, &cur->own_cap, &off, base + ns[0], (size_t)ns[1], base + vs[0], (size_t)vs[1])) {
                PyErr_NoMemory();
                goto fail;
            }
        }
        cur->rp = cur->own ? (const uint8_t *)cur->own : (const uint8_t *)"";
        cur->rend = cur->rp + off;
        if (queue(&tk, cur)) goto fail;
    }
    if (take_queued(&tk)) goto fail;
    Py_ssize_t next = (Py_ssize_t)(c.p - base);
    result = Py_BuildValue("(nnnnOnn)", n_samples, tk.n_hist, tk.n_ex, n_meta, rejects, next, n_ignored);

fail:
    /* A malformed series refuses the whole request; the series before it are looked up all the
     * same (keys and cache entries made), wherever the lookahead was. */
    if (err && !PyErr_Occurred()) take_queued(&tk);
    if (store_made(&kr)) Py_CLEAR(result);
    let_go_ring(&tk);
    PyMem_Free(refs.v);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&symbuf);
    Py_XDECREF(rejects);
    if (!result && err && !PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, err);
    return result;
}

static PyObject *scan(PyObject *self, PyObject *args) {
    Py_buffer buf;
    unsigned int series_field, other_field;
    Py_ssize_t max_series;
    if (!PyArg_ParseTuple(args, "y*IIn", &buf, &series_field, &other_field, &max_series)) return NULL;
    cursor c = {(const uint8_t *)buf.buf, (const uint8_t *)buf.buf + buf.len};
    Py_ssize_t series = 0;
    uint32_t unknown = 0;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    while (c.p < c.end) {
        uint32_t field;
        unsigned wt;
        cursor sub;
        if (read_tag(&c, &field, &wt)) { bad = 1; break; }
        if (wt == 2 && (field == series_field || field == other_field)) {
            if (read_len(&c, &sub)) { bad = 1; break; }
            if (field == series_field && ++series > max_series) break;
            continue;
        }
        if (!unknown) unknown = field;
        if (skip_field(&c, field, wt, MAX_DEPTH)) { bad = 1; break; }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "malformed top-level field");
        return NULL;
    }
    return Py_BuildValue("(nI)", series, (unsigned int)unknown);
}

/* key_type(SeriesKey): the class enter_key makes keys of, whose slots must be labels, name, state. */
static PyObject *key_type(PyObject *self, PyObject *type) {
    (void)self;
    PyObject *slots = PyType_Check(type) ? PyObject_GetAttrString(type, "__slots__") : NULL;
    PyObject *want = slots ? Py_BuildValue("(sss)", "labels", "name", "state") : NULL;
    int same = want ? PyObject_RichCompareBool(slots, want, Py_EQ) : -1;
    Py_XDECREF(slots);
    Py_XDECREF(want);
    if (same < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "key_type takes a class");
        return NULL;
    }
    if (!same) {
        PyErr_SetString(PyExc_TypeError, "the key type's __slots__ must be ('labels', 'name', 'state')");
        return NULL;
    }
    if (!labels_name && !(labels_name = PyUnicode_InternFromString("labels"))) return NULL;
    if (!name_name && !(name_name = PyUnicode_InternFromString("name"))) return NULL;
    if (!state_name && !(state_name = PyUnicode_InternFromString("state"))) return NULL;
    if (!metric_label && !(metric_label = PyUnicode_InternFromString("__name__"))) return NULL;
    if (!empty_name && !(empty_name = PyUnicode_InternFromString(""))) return NULL;
    Py_XSETREF(series_key, (PyTypeObject *)Py_NewRef(type));
    Py_RETURN_NONE;
}

/* pin_keys(keys, pinned, young, old) -> (pinned now, their labels, their characters)
 *   LabelCache.pin for each SeriesKey of the list keys: pinned[key.labels] = key, and the labels
 *   out of the two generations young and old (the first that holds them); counts the keys newly
 *   pinned, for the cache's byte estimate. */
static PyObject *pin_keys(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *keys, *pinned, *young, *old;
    if (!PyArg_ParseTuple(args, "O!O!O!O!", &PyList_Type, &keys, &PyDict_Type, &pinned, &PyDict_Type, &young,
                          &PyDict_Type, &old))
        return NULL;
    if (!series_key) {
        PyErr_SetString(PyExc_RuntimeError, "key_type() was not called");
        return NULL;
    }
    Py_ssize_t newly = 0, nlabels = 0, nchars = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keys); i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        PyObject *labels = PyObject_GetAttr(key, labels_name);
        if (!labels) return NULL;
        Py_ssize_t chars = chars_of(labels);
        Py_ssize_t held = PyDict_GET_SIZE(pinned);
        int rc = chars < 0 ? -1 : PyDict_SetItem(pinned, labels, key);
        if (!rc && PyDict_GET_SIZE(pinned) > held) {
            newly++;
            nlabels += PyTuple_GET_SIZE(labels);
            nchars += chars;
        }
        if (!rc && (rc = PyDict_DelItem(young, labels)) && PyErr_ExceptionMatches(PyExc_KeyError)) {
            PyErr_Clear();
            if ((rc = PyDict_DelItem(old, labels)) && PyErr_ExceptionMatches(PyExc_KeyError)) {
                PyErr_Clear();
                rc = 0;
            }
        }
        Py_DECREF(labels);
        if (rc) return NULL;
    }
    return Py_BuildValue("(nnn)", newly, nlabels, nchars);
}

/* intern_labels(sets, shared, pinned, keys, old_keys, intern) -> ([SeriesKey, ...], made)
 *   LabelCache.intern for each label set of the list sets, in one call: the key pinned or keys
 *   holds for it, else a new SeriesKey of the pairs of shared, entered in keys. A set old_keys
 *   holds, or one that is not a tuple of (str, str) pairs, goes to intern(labels) (which moves it,
 *   or refuses it). made: (keys made, their labels, their characters), for the cache's estimate. */
static PyObject *intern_labels(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *sets, *shared, *pinned, *keys, *old_keys, *intern;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!O", &PyList_Type, &sets, &PyDict_Type, &shared, &PyDict_Type, &pinned,
                          &PyDict_Type, &keys, &PyDict_Type, &old_keys, &intern))
        return NULL;
    if (!series_key) {
        PyErr_SetString(PyExc_RuntimeError, "key_type() was not called");
        return NULL;
    }
    Py_ssize_t made = 0, made_labels = 0, made_chars = 0;
    PyObject *out = PyList_New(0);
    for (Py_ssize_t i = 0; out && i < PyList_GET_SIZE(sets); i++) {
        PyObject *labels = PyList_GET_ITEM(sets, i), *key = NULL;
        Py_ssize_t chars = chars_of(labels);
        int moved = 0;
        if (chars < 0) {
            PyErr_Clear(); /* intern judges it */
            key = PyObject_CallOneArg(intern, labels);
        } else if ((key = held_key(pinned, keys, labels))) {
            Py_INCREF(key);
        } else if (!PyErr_Occurred() && (moved = PyDict_Contains(old_keys, labels)) > 0) {
            key = PyObject_CallOneArg(intern, labels);
        } else if (moved == 0) {
            PyObject *mine = PyTuple_New(PyTuple_GET_SIZE(labels));
            for (Py_ssize_t j = 0; mine && j < PyTuple_GET_SIZE(labels); j++) {
                PyObject *pair = shared_pair(shared, PyTuple_GET_ITEM(labels, j));
                if (pair) PyTuple_SET_ITEM(mine, j, pair);
                else Py_CLEAR(mine);
            }
            if (mine && (key = make_key(keys, mine))) {
                made++;
                made_labels += PyTuple_GET_SIZE(mine);
                made_chars += chars;
            }
            Py_XDECREF(mine);
        }
        if (!key || PyList_Append(out, key)) Py_CLEAR(out);
        Py_XDECREF(key);
    }
    return out ? Py_BuildValue("(N(nnn))", out, made, made_labels, made_chars) : NULL;
}

/* label_chars(labels): chars_of for Python, taken for every new series the Python path keys (in
   Python it was a sixth of binding one). */
static PyObject *label_chars(PyObject *self, PyObject *labels) {
    (void)self;
    Py_ssize_t total = chars_of(labels);
    return total < 0 ? NULL : PyLong_FromSsize_t(total);
}

/* untracked_list(): an empty list the cyclic GC does not track. A request's columns hold
   hundreds of thousands of keys and numbers and nothing that refers back to them, so they can
   be in no cycle; tracked, every collection while they live would walk them all, touching each
   key's object, with the GIL held (about 0.1 s for 750,000 samples). */
static PyObject *untracked_list(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    PyObject *out = PyList_New(0);
    if (out) PyObject_GC_UnTrack(out);
    return out;
}

static PyMethodDef methods[] = {
    {"untracked_list", untracked_list, METH_NOARGS, "An empty list the cyclic GC does not track."},
    {"label_chars", label_chars, METH_O, "The characters of a label set's names and values."},
    {"decode_v1", decode_v1, METH_VARARGS, "Decode a decompressed remote write 1.0 request."},
    {"symbols_v2", symbols_v2, METH_VARARGS, "Where a parsed remote write 2.0 request's symbols are."},
    {"decode_v2", decode_v2, METH_VARARGS, "Decode a parsed remote write 2.0 request."},
    {"scan", scan, METH_VARARGS, "Count a request's series and find its first unknown top-level field."},
    {"siphash128", py_siphash128, METH_VARARGS, "SipHash-2-4-128 of data under a 16-byte key."},
    {"key_type", key_type, METH_O, "Set the class of the series keys decoding makes."},
    {"pin_keys", pin_keys, METH_VARARGS, "Pin series keys in a label cache's tables."},
    {"intern_labels", intern_labels, METH_VARARGS, "Intern label sets in a label cache's tables."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastdecode", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastdecode(void) {
    const uint16_t one = 1;
    if (*(const uint8_t *)&one != 1) {
        PyErr_SetString(PyExc_ImportError, "_fastdecode supports little-endian hosts only");
        return NULL;
    }
    intern_strings = !(Py_Version >= 0x030C0000 && Py_Version < 0x030C05F0);
    PyObject *os = PyImport_ImportModule("os");
    PyObject *seed = os ? PyObject_CallMethod(os, "urandom", "i", 16) : NULL;
    Py_XDECREF(os);
    if (!seed) return NULL;
    memcpy(&sip_k0, PyBytes_AS_STRING(seed), 8);
    memcpy(&sip_k1, PyBytes_AS_STRING(seed) + 8, 8);
    pair_seed = sip_k0 ^ (sip_k1 << 1);
    Py_DECREF(seed);
    if (!zero && !(zero = PyFloat_FromDouble(0.0))) return NULL;
    if (PyType_Ready(&DigestMapType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddObjectRef(m, "DigestMap", (PyObject *)&DigestMapType)) Py_CLEAR(m);
    return m;
}
