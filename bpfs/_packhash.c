/* The leaf hashes of a pack's Merkle tree (packtree.py), many at once and without the GIL.
 *
 * leaf_hashes(data, first_index, leaf_size, person) -> bytes: for each whole leaf i of data
 * (len(data) // leaf_size of them), BLAKE2b-256 with personalisation `person` (at most 16 bytes,
 * no key) of 0x00 || u64le(first_index + i) || leaf, the 32-byte digests back to back. The same
 * bytes as packtree.hash_leaf (hashlib), which a test checks; this only saves the Python work
 * per 2 KiB leaf that held the GIL while writers sealed in other threads.
 *
 * LANES: how many leaves one compression call hashes side by side (4 with AVX2, else 1;
 * BPFS_PACKHASH_SCALAR=1 in the environment forces 1, for the tests).
 *
 * BLAKE2b as in RFC 7693 (the parameter block of the BLAKE2 paper, section 2.5, for the
 * personalisation): 12 rounds of G over a 16-word state, 128-byte blocks.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const uint64_t IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

static const uint8_t SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

static inline uint64_t rotr64(uint64_t x, unsigned n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline void store64(uint8_t *p, uint64_t v)
{
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, 8);
}

#define G(a, b, c, d, x, y)            \
    do {                               \
        v[a] = v[a] + v[b] + (x);      \
        v[d] = rotr64(v[d] ^ v[a], 32); \
        v[c] = v[c] + v[d];            \
        v[b] = rotr64(v[b] ^ v[c], 24); \
        v[a] = v[a] + v[b] + (y);      \
        v[d] = rotr64(v[d] ^ v[a], 16); \
        v[c] = v[c] + v[d];            \
        v[b] = rotr64(v[b] ^ v[c], 63); \
    } while (0)

/* One round: the columns, then the diagonals, with the message words in the order s. */
#define ROUND(GF, m, s)                              \
    do {                                             \
        GF(0, 4, 8, 12, m[(s)[0]], m[(s)[1]]);       \
        GF(1, 5, 9, 13, m[(s)[2]], m[(s)[3]]);       \
        GF(2, 6, 10, 14, m[(s)[4]], m[(s)[5]]);      \
        GF(3, 7, 11, 15, m[(s)[6]], m[(s)[7]]);      \
        GF(0, 5, 10, 15, m[(s)[8]], m[(s)[9]]);      \
        GF(1, 6, 11, 12, m[(s)[10]], m[(s)[11]]);    \
        GF(2, 7, 8, 13, m[(s)[12]], m[(s)[13]]);     \
        GF(3, 4, 9, 14, m[(s)[14]], m[(s)[15]]);     \
    } while (0)

/* One compression of block (128 bytes) into h, t bytes hashed so far, last block or not. */
static void compress(uint64_t h[8], const uint8_t *block, uint64_t t, int last)
{
    uint64_t v[16], m[16];
    for (int i = 0; i < 16; i++)
        m[i] = load64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = IV[i];
    }
    v[12] ^= t;  /* the counter's high word stays 0: a message here is far below 2^64 bytes */
    if (last)
        v[14] = ~v[14];
    for (int r = 0; r < 12; r++) {
        ROUND(G, m, SIGMA[r]);
    }
    for (int i = 0; i < 8; i++)
        h[i] ^= v[i] ^ v[i + 8];
}

/* BLAKE2b-256 of prefix (9 bytes) || data (len bytes), from the initial state h0. */
static void hash_leaf(const uint64_t h0[8], const uint8_t prefix[9], const uint8_t *data, size_t len,
                      uint8_t out[32])
{
    uint64_t h[8];
    uint8_t block[128];
    size_t total = 9 + len, done = 0, pos = 0;
    memcpy(h, h0, sizeof h);
    /* the first block: the prefix, then the data */
    size_t first = len < 128 - 9 ? len : 128 - 9;
    memcpy(block, prefix, 9);
    memcpy(block + 9, data, first);
    pos = first;
    if (total <= 128) {
        memset(block + 9 + first, 0, 128 - 9 - first);
        compress(h, block, total, 1);
    } else {
        compress(h, block, 128, 0);
        done = 128;
        while (total - done > 128) {
            compress(h, data + pos, done + 128, 0);
            pos += 128;
            done += 128;
        }
        size_t rest = total - done;
        memcpy(block, data + pos, rest);
        memset(block + rest, 0, 128 - rest);
        compress(h, block, total, 1);
    }
    for (int i = 0; i < 4; i++)
        store64(out + 8 * i, h[i]);
}

/* Four leaves at once: the same compression on four independent messages of equal length, one
 * per 64-bit lane of a 256-bit vector (GCC's vector extensions, compiled for AVX2 and chosen at
 * run time when the CPU has it). Leaves are independent and all of one size, so the four lanes run
 * in lockstep: about three times the throughput of one leaf at a time on this machine's cores. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define HAVE_LANES4 1
typedef uint64_t v4u64 __attribute__((vector_size(32)));

#define ROTR4(x, n) (((x) >> (n)) | ((x) << (64 - (n))))
#define G4(a, b, c, d, x, y)           \
    do {                               \
        v[a] = v[a] + v[b] + (x);      \
        v[d] = ROTR4(v[d] ^ v[a], 32); \
        v[c] = v[c] + v[d];            \
        v[b] = ROTR4(v[b] ^ v[c], 24); \
        v[a] = v[a] + v[b] + (y);      \
        v[d] = ROTR4(v[d] ^ v[a], 16); \
        v[c] = v[c] + v[d];            \
        v[b] = ROTR4(v[b] ^ v[c], 63); \
    } while (0)

/* Block k (128 bytes) of the message prefix(index) || data of one leaf, where it can be read in
 * place, else assembled in `scratch` (the first block, and the last when it is partial). */
static inline const uint8_t *block_of(const uint8_t *data, size_t len, uint64_t index, size_t k,
                                      uint8_t scratch[128])
{
    size_t start = 128 * k, total = 9 + len;
    if (start >= 9 && start + 128 <= total)
        return data + start - 9;
    memset(scratch, 0, 128);
    size_t at = 0;
    if (start < 9) {
        scratch[0] = 0;
        for (int b = 0; b < 8; b++)
            scratch[1 + b] = (uint8_t)(index >> (8 * b));
        at = 9 - start;
    }
    size_t from = start + at - 9, n = total - (start + at);
    if (n > 128 - at)
        n = 128 - at;
    memcpy(scratch + at, data + from, n);
    return scratch;
}

__attribute__((target("avx2"))) static void hash_leaves4(const uint64_t h0[8], const uint8_t *data,
                                                          size_t leaf_size, uint64_t first_index,
                                                          uint8_t *out)
{
    v4u64 h[8], v[16], m[16];
    uint8_t scratch[4][128];
    const uint8_t *lane_data[4];
    for (int j = 0; j < 4; j++)
        lane_data[j] = data + (size_t)j * leaf_size;
    for (int i = 0; i < 8; i++)
        h[i] = (v4u64){h0[i], h0[i], h0[i], h0[i]};
    size_t total = 9 + leaf_size, blocks = (total + 127) / 128;
    for (size_t k = 0; k < blocks; k++) {
        const uint8_t *blk[4];
        for (int j = 0; j < 4; j++)
            blk[j] = block_of(lane_data[j], leaf_size, first_index + (uint64_t)j, k, scratch[j]);
        for (int i = 0; i < 16; i++)
            m[i] = (v4u64){load64(blk[0] + 8 * i), load64(blk[1] + 8 * i), load64(blk[2] + 8 * i),
                           load64(blk[3] + 8 * i)};
        uint64_t t = k + 1 == blocks ? total : 128 * (k + 1);
        for (int i = 0; i < 8; i++) {
            v[i] = h[i];
            v[i + 8] = (v4u64){IV[i], IV[i], IV[i], IV[i]};
        }
        v[12] ^= (v4u64){t, t, t, t};
        if (k + 1 == blocks)
            v[14] = ~v[14];
        for (int r = 0; r < 12; r++) {
            ROUND(G4, m, SIGMA[r]);
        }
        for (int i = 0; i < 8; i++)
            h[i] ^= v[i] ^ v[i + 8];
    }
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < 4; i++)
            store64(out + 32 * j + 8 * i, h[i][j]);
}

static int have_avx2;
#endif

static PyObject *leaf_hashes(PyObject *self, PyObject *args)
{
    Py_buffer data, person;
    unsigned long long first_index;
    Py_ssize_t leaf_size;
    if (!PyArg_ParseTuple(args, "y*Kny*", &data, &first_index, &leaf_size, &person))
        return NULL;
    if (leaf_size <= 0 || person.len > 16) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&person);
        PyErr_SetString(PyExc_ValueError, "leaf_size must be positive and person at most 16 bytes");
        return NULL;
    }
    Py_ssize_t n = data.len / leaf_size;
    PyObject *result = PyBytes_FromStringAndSize(NULL, n * 32);
    if (result == NULL) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&person);
        return NULL;
    }
    /* the parameter block: digest length 32, no key, fanout 1, depth 1, personalisation */
    uint8_t param[64] = {32, 0, 1, 1};
    memcpy(param + 48, person.buf, person.len);
    uint64_t h0[8];
    for (int i = 0; i < 8; i++)
        h0[i] = IV[i] ^ load64(param + 8 * i);
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);
    const uint8_t *buf = data.buf;
    Py_BEGIN_ALLOW_THREADS
    uint8_t prefix[9] = {0};
    Py_ssize_t i = 0;
#ifdef HAVE_LANES4
    if (have_avx2)
        for (; i + 4 <= n; i += 4)
            hash_leaves4(h0, buf + i * leaf_size, (size_t)leaf_size, first_index + (uint64_t)i, out + 32 * i);
#endif
    for (; i < n; i++) {
        uint64_t index = first_index + (uint64_t)i;
        for (int b = 0; b < 8; b++)
            prefix[1 + b] = (uint8_t)(index >> (8 * b));
        hash_leaf(h0, prefix, buf + i * leaf_size, (size_t)leaf_size, out + 32 * i);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    PyBuffer_Release(&person);
    return result;
}

static PyMethodDef methods[] = {
    {"leaf_hashes", leaf_hashes, METH_VARARGS,
     "leaf_hashes(data, first_index, leaf_size, person) -> the 32-byte leaf hashes of data's whole "
     "leaves, back to back (see packtree.hash_leaf)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_packhash", NULL, -1, methods};

PyMODINIT_FUNC PyInit__packhash(void)
{
#ifdef HAVE_LANES4
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2") && getenv("BPFS_PACKHASH_SCALAR") == NULL;
#endif
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
#ifdef HAVE_LANES4
    int lanes = have_avx2 ? 4 : 1;
#else
    int lanes = 1;
#endif
    if (PyModule_AddIntConstant(m, "LANES", lanes) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
