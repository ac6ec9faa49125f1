/* FastCDC (2020, normalized chunking level 1, two bytes per step) over a caller's gear table.
 *
 * bpfs keys its chunker with a whole secret table (256 x 64-bit entries from a PRF; see
 * chunker.py) instead of one constant XORed into the public table, which pyfastcdc would take.
 * The cut rule is the one of pyfastcdc 0.3 and of the Rust `fastcdc` crate's v2020 module: after
 * min_size bytes, cut where (hash & mask_s) == 0 before avg_size and (hash & mask_l) == 0 after,
 * at max_size at the latest; the hash is gear-shifted (hash = (hash << 1) + table[byte]).
 *
 * cut(table, data, min_size, avg_size, max_size, mask_s, mask_l) -> list of chunk lengths; the
 * last ends at the end of data. The loop runs without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static uint64_t cut_one(const uint64_t *gear, const uint64_t *gear_ls, const uint8_t *buf, uint64_t len,
                        uint64_t min_size, uint64_t avg_size, uint64_t max_size, uint64_t mask_s,
                        uint64_t mask_l)
{
    uint64_t remaining = len, center = avg_size, hash = 0, pos;
    if (remaining <= min_size)
        return remaining;
    if (remaining > max_size)
        remaining = max_size;
    else if (remaining < center)
        center = remaining;
    const uint64_t start = (min_size / 2) * 2, mid = (center / 2) * 2, end = (remaining / 2) * 2;
    const uint64_t mask_s_ls = mask_s << 1, mask_l_ls = mask_l << 1;
    for (pos = start; pos < mid; pos += 2) {
        hash = (hash << 2) + gear_ls[buf[pos]];
        if (!(hash & mask_s_ls))
            return pos;
        hash += gear[buf[pos + 1]];
        if (!(hash & mask_s))
            return pos + 1;
    }
    for (pos = mid; pos < end; pos += 2) {
        hash = (hash << 2) + gear_ls[buf[pos]];
        if (!(hash & mask_l_ls))
            return pos;
        hash += gear[buf[pos + 1]];
        if (!(hash & mask_l))
            return pos + 1;
    }
    return remaining;
}

static PyObject *cut(PyObject *self, PyObject *args)
{
    Py_buffer table, data;
    unsigned long long min_size, avg_size, max_size, mask_s, mask_l;
    if (!PyArg_ParseTuple(args, "y*y*KKKKK", &table, &data, &min_size, &avg_size, &max_size, &mask_s, &mask_l))
        return NULL;
    PyObject *out = NULL;
    uint64_t *lengths = NULL;
    if (table.len != 256 * 8) {
        PyErr_SetString(PyExc_ValueError, "the gear table must be 256 entries of 8 bytes");
        goto done;
    }
    if (min_size < 64 || min_size > avg_size || avg_size > max_size || max_size > ((uint64_t)1 << 32)) {
        PyErr_SetString(PyExc_ValueError, "chunk sizes must satisfy 64 <= min <= avg <= max <= 4 GiB");
        goto done;
    }
    uint64_t gear[256], gear_ls[256];
    for (int i = 0; i < 256; i++) {  /* little-endian entries, as chunker.py writes them */
        uint64_t v = 0;
        for (int b = 7; b >= 0; b--)
            v = (v << 8) | ((const uint8_t *)table.buf)[i * 8 + b];
        gear[i] = v;
        gear_ls[i] = v << 1;
    }
    const uint8_t *buf = data.buf;
    uint64_t len = (uint64_t)data.len, n = 0, cap = len / (min_size - 1) + 2;
    lengths = PyMem_RawMalloc(cap * sizeof *lengths);
    if (!lengths) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    uint64_t offset = 0;
    while (offset < len) {
        uint64_t c = cut_one(gear, gear_ls, buf + offset, len - offset, min_size, avg_size, max_size, mask_s,
                             mask_l);
        lengths[n++] = c;
        offset += c;
    }
    Py_END_ALLOW_THREADS
    out = PyList_New((Py_ssize_t)n);
    if (!out)
        goto done;
    for (uint64_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(lengths[i]);
        if (!v) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, v);
    }
done:
    PyMem_RawFree(lengths);
    PyBuffer_Release(&table);
    PyBuffer_Release(&data);
    return out;
}

static PyMethodDef methods[] = {
    {"cut", cut, METH_VARARGS, "cut(table, data, min_size, avg_size, max_size, mask_s, mask_l) -> chunk lengths"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gearcdc", "FastCDC over a caller's gear table.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__gearcdc(void) { return PyModule_Create(&module); }
