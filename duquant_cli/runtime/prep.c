/* The activation path of `DuQuantLinear.forward_rows` around its matmul, fused. Before it
   (`duquant_prep`), per token row: the input block transform, the permutation, the second block
   transform and the per-token dynamic quantization; after the int8 matmul (`duquant_finish`):
   the token's scale, the bias, the row restore and the cast. Each row stays in cache from load
   to store, where torch's ops make a pass over all the activations per step.
   `runtime/prep.py` builds this file at first use and checks it against those ops. Every
   formula is the torch op's: the same float32 products, division and round-half-even; only
   the order of a block product's sum may differ (here: over the block's input channels, in
   order, with fused multiply-adds). AVX-512 where the CPU has it, plain C elsewhere. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef struct {
    const float *blocks; /* [nb, b, b]: y_k = x_k @ R_k; where `scales` is set, R_0 only */
    const float *scales; /* [nb * b]: y_k = (x_k * s_k) @ R_0 (blocks one matrix up to them) */
    const float *tail;   /* [t, t], the last t channels, or NULL */
    int64_t nb, b, t;    /* nb == 0: no transform */
} blocks_t;

enum { IN_FLOAT32 = 0, IN_BFLOAT16 = 1 };
enum { OUT_FLOAT32 = 0, OUT_BFLOAT16 = 1, OUT_CODES = 2 };

typedef struct {
    const void *x;        /* [rows, n], IN_* */
    void *out;            /* [rows, n], OUT_*: scaled back (dense), or uint8 codes + 128 */
    float *scale;         /* [rows]: the per-token scale (OUT_CODES), or NULL */
    const int64_t *perm;  /* [n]: h[:, j] = h[:, perm[j]] between the transforms, or NULL */
    blocks_t in1, in2;
    int64_t rows, n;
    int32_t in_dtype, out_kind;
    float clip_over_qmax; /* act_clip / qmax, as torch's float32 multiply sees it */
    float qmax;
    int32_t clamp;        /* act_clip < 1: codes clamped to [-qmax - 1, qmax] */
} prep_t;

static inline float bf16_to_float(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as c10::BFloat16 */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (isnan(f)) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* y = (x[idx] * s) @ R for one b x b block (idx, s NULL: x itself, unscaled). */
static void block(const float *restrict x, const int64_t *idx, const float *restrict s,
                  const float *restrict r, float *restrict y, int64_t b) {
    for (int64_t j = 0; j < b; j++) y[j] = 0.0f;
    for (int64_t i = 0; i < b; i++) {
        float v = idx ? x[idx[i]] : x[i];
        if (s) v *= s[i];
        for (int64_t j = 0; j < b; j++) y[j] += v * r[i * b + j];
    }
}

#ifdef __AVX512F__
/* 16 floats to bfloat16, as `float_to_bf16`. */
static inline __m256i bf16x16(__m512 f) {
    const __m512i u = _mm512_castps_si512(f);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd);
    const __m512i bits = _mm512_mask_mov_epi32(_mm512_srli_epi32(r, 16),
                                               _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q),
                                               _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(bits);
}

/* x[idx[0..16)]: two gathers of 8 (the indices are int64, as torch keeps them). */
static inline __m512 gather16(const float *x, const int64_t *idx) {
    const __m256 lo = _mm512_i64gather_ps(_mm512_loadu_si512(idx), x, 4);
    const __m256 hi = _mm512_i64gather_ps(_mm512_loadu_si512(idx + 8), x, 4);
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)),
                                               _mm256_castps_pd(hi), 1));
}

/* 16-wide blocks, GROUP at a time, each block's sums in one register: GROUP independent chains
   of multiply-adds hide their latency. `rstride`: 0 where every block is R_0 up to row scales,
   256 for a stack of distinct blocks. Returns the blocks done. */
#define GROUP 8
static int64_t blocks16(const float *restrict x, const int64_t *idx, const float *restrict s,
                        const float *restrict r, int64_t rstride, float *restrict y, int64_t nb) {
    float xs[16 * GROUP];
    int64_t k = 0;
    for (; k + GROUP <= nb; k += GROUP) {
        for (int u = 0; u < GROUP; u++) {
            const int64_t c = (k + u) * 16;
            __m512 v = idx ? gather16(x, idx + c) : _mm512_loadu_ps(x + c);
            if (s) v = _mm512_mul_ps(v, _mm512_loadu_ps(s + c));
            _mm512_storeu_ps(xs + 16 * u, v);
        }
        __m512 acc[GROUP];
        for (int u = 0; u < GROUP; u++) acc[u] = _mm512_setzero_ps();
        const float *rk = r + k * rstride;
        if (rstride == 0) {
            for (int i = 0; i < 16; i++) {
                const __m512 ri = _mm512_loadu_ps(r + 16 * i);
                for (int u = 0; u < GROUP; u++)
                    acc[u] = _mm512_fmadd_ps(_mm512_set1_ps(xs[16 * u + i]), ri, acc[u]);
            }
        } else {
            for (int i = 0; i < 16; i++)
                for (int u = 0; u < GROUP; u++)
                    acc[u] = _mm512_fmadd_ps(_mm512_set1_ps(xs[16 * u + i]),
                                             _mm512_loadu_ps(rk + u * rstride + 16 * i), acc[u]);
        }
        for (int u = 0; u < GROUP; u++) _mm512_storeu_ps(y + (k + u) * 16, acc[u]);
    }
    return k;
}
#endif

/* y = x[perm] @ blockdiag(t) (perm NULL: x @ blockdiag(t)). */
static void transform(const float *restrict x, const int64_t *perm, float *restrict y,
                      const blocks_t *t) {
    const int64_t b = t->b, stride = t->scales ? 0 : b * b;
    int64_t k = 0;
#ifdef __AVX512F__
    if (b == 16) k = blocks16(x, perm, t->scales, t->blocks, stride, y, t->nb);
#endif
    for (; k < t->nb; k++)
        block(perm ? x : x + k * b, perm ? perm + k * b : NULL,
              t->scales ? t->scales + k * b : NULL, t->blocks + k * stride, y + k * b, b);
    /* The tail's channels: x[perm[head:]] (or x[head:]). */
    const int64_t head = t->nb * b;
    if (t->tail) block(perm ? x : x + head, perm ? perm + head : NULL, NULL, t->tail, y + head, t->t);
}

/* The row's (min, max). */
static void min_max(const float *restrict h, int64_t n, float *lo_out, float *hi_out) {
    float lo = h[0], hi = h[0];
    int64_t j = 0;
#ifdef __AVX512F__
    __m512 vlo = _mm512_set1_ps(h[0]), vhi = vlo;
    for (; j + 16 <= n; j += 16) {
        const __m512 v = _mm512_loadu_ps(h + j);
        vlo = _mm512_min_ps(vlo, v);
        vhi = _mm512_max_ps(vhi, v);
    }
    lo = _mm512_reduce_min_ps(vlo);
    hi = _mm512_reduce_max_ps(vhi);
#endif
    for (; j < n; j++) {
        lo = h[j] < lo ? h[j] : lo;
        hi = h[j] > hi ? h[j] : hi;
    }
    *lo_out = lo, *hi_out = hi;
}

/* round(h / scale), clamped where asked, then stored as `out_kind`. */
static void quantize(const prep_t *p, const float *restrict h, float scale, int64_t i) {
    const int64_t n = p->n;
    const float qmax = p->qmax, qmin = -qmax - 1.0f;
    int64_t j = 0;
#ifdef __AVX512F__
    const __m512 vs = _mm512_set1_ps(scale), vmin = _mm512_set1_ps(qmin);
    const __m512 vmax = _mm512_set1_ps(qmax), shift = _mm512_set1_ps(128.0f);
    for (; j + 16 <= n; j += 16) {
        __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(h + j), vs),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        if (p->clamp) q = _mm512_min_ps(_mm512_max_ps(q, vmin), vmax);
        if (p->out_kind == OUT_CODES) {
            const __m512i c = _mm512_cvttps_epi32(_mm512_add_ps(q, shift));
            _mm_storeu_si128((__m128i *)((uint8_t *)p->out + i * n + j), _mm512_cvtepi32_epi8(c));
        } else if (p->out_kind == OUT_BFLOAT16) {
            _mm256_storeu_si256((__m256i *)((uint16_t *)p->out + i * n + j),
                                bf16x16(_mm512_mul_ps(q, vs)));
        } else {
            _mm512_storeu_ps((float *)p->out + i * n + j, _mm512_mul_ps(q, vs));
        }
    }
#endif
    for (; j < n; j++) {
        float q = nearbyintf(h[j] / scale);
        if (p->clamp) q = q < qmin ? qmin : (q > qmax ? qmax : q);
        if (p->out_kind == OUT_CODES)
            ((uint8_t *)p->out)[i * n + j] = (uint8_t)(q + 128.0f);
        else if (p->out_kind == OUT_BFLOAT16)
            ((uint16_t *)p->out)[i * n + j] = float_to_bf16(q * scale);
        else
            ((float *)p->out)[i * n + j] = q * scale;
    }
}

static void row(const prep_t *p, int64_t i, float *a, float *c) {
    const int64_t n = p->n;
    float *cur = a, *other = c, *swap;
    if (p->in_dtype == IN_BFLOAT16) {
        const uint16_t *x = (const uint16_t *)p->x + i * n;
        for (int64_t j = 0; j < n; j++) cur[j] = bf16_to_float(x[j]);
    } else {
        memcpy(cur, (const float *)p->x + i * n, n * sizeof(float));
    }
    if (p->in1.nb) {
        transform(cur, NULL, other, &p->in1);
        swap = cur, cur = other, other = swap;
    }
    if (p->in2.nb) { /* the permutation read by the second transform */
        transform(cur, p->perm, other, &p->in2);
        swap = cur, cur = other, other = swap;
    } else if (p->perm) {
        for (int64_t j = 0; j < n; j++) other[j] = cur[p->perm[j]];
        swap = cur, cur = other, other = swap;
    }
    float lo, hi;
    min_max(cur, n, &lo, &hi);
    float scale = (hi > -lo ? hi : -lo) * p->clip_over_qmax;
    scale = scale < 1e-8f ? 1e-8f : scale;
    if (p->scale) p->scale[i] = scale;
    quantize(p, cur, scale, i);
}

typedef struct {
    const float *y;      /* [rows, n] float32: the int8 matmul's output, weight scale applied */
    void *out;           /* [rows, n], OUT_FLOAT32 or OUT_BFLOAT16 */
    const float *scale;  /* [rows]: the per-token scale */
    const float *bias;   /* [n], added before the restore (rotated back by it), or NULL */
    blocks_t restore;    /* y @ blockdiag(restore) (nb == 0: none) */
    int64_t rows, n;
    int32_t out_kind;
} finish_t;

static void store(const float *restrict h, int64_t n, int32_t kind, void *dst) {
    if (kind == OUT_FLOAT32) {
        memcpy(dst, h, n * sizeof(float));
        return;
    }
    uint16_t *out = dst;
    int64_t j = 0;
#ifdef __AVX512F__
    for (; j + 16 <= n; j += 16) {
        _mm256_storeu_si256((__m256i *)(out + j), bf16x16(_mm512_loadu_ps(h + j)));
    }
#endif
    for (; j < n; j++) out[j] = float_to_bf16(h[j]);
}

static void finish_row(const finish_t *f, int64_t i, float *a, float *c) {
    const int64_t n = f->n;
    const float *y = f->y + i * n, s = f->scale[i];
    int64_t j = 0;
#ifdef __AVX512F__ /* y * s, then + bias: two roundings, as torch's two ops */
    const __m512 vs = _mm512_set1_ps(s);
    for (; j + 16 <= n; j += 16) {
        __m512 v = _mm512_mul_ps(_mm512_loadu_ps(y + j), vs);
        if (f->bias) v = _mm512_add_ps(v, _mm512_loadu_ps(f->bias + j));
        _mm512_storeu_ps(a + j, v);
    }
#endif
    for (; j < n; j++) {
        const volatile float v = y[j] * s; /* not contracted with the add below */
        a[j] = f->bias ? v + f->bias[j] : v;
    }
    if (f->restore.nb) {
        transform(a, NULL, c, &f->restore);
        a = c;
    }
    store(a, n, f->out_kind, (char *)f->out + i * n * (f->out_kind == OUT_FLOAT32 ? 4 : 2));
}

/* Runs `fn` on every row, each thread with its own two row buffers of n floats. Threads only
   where there is work for them: a parallel region costs a few microseconds. 0 on success, 1
   where a buffer could not be allocated. */
static int each_row(void (*fn)(const void *, int64_t, float *, float *), const void *args,
                    int64_t rows, int64_t n) {
    int failed = 0;
#pragma omp parallel if (rows > 1 && rows * n >= 16384) reduction(| : failed)
    {
        float *buf = malloc(2 * n * sizeof(float));
        if (!buf) failed = 1;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++)
            if (buf) fn(args, i, buf, buf + n);
        free(buf);
    }
    return failed;
}

static void prep_row(const void *p, int64_t i, float *a, float *c) { row(p, i, a, c); }
static void finish_one(const void *f, int64_t i, float *a, float *c) { finish_row(f, i, a, c); }

int duquant_prep(const prep_t *p) { return each_row(prep_row, p, p->rows, p->n); }
int duquant_finish(const finish_t *f) { return each_row(finish_one, f, f->rows, f->n); }

/* The int8 matmul at a few tokens, (u - 128) W^T * scale as oneDNN's computes it (exact int32
   sums, then one float32 product), reading the weight oneDNN prepacked for itself: 64 outputs
   by 4 inputs per 256 bytes, [ceil(n / 64)][kp / 4][64][4] with the inputs padded to kp, then
   int32 comp[n] = -(sum of the row's codes). oneDNN's kernel there reads the weight at half
   the speed and costs 20 us a call more; `prep.py` checks the layout against oneDNN's before
   any layer uses this. */
typedef struct {
    const uint8_t *u;    /* [rows, k]: codes + 128 */
    const int8_t *w;     /* oneDNN's prepacked weight, as above */
    const float *scale;  /* [n]: the weight's per-row scale */
    float *y;            /* [rows, n] */
    int64_t rows, n, k, kp;
} gemv_t;

#define GEMV_ROWS 4 /* tokens sharing one read of the weight (16 accumulators) */

#ifdef __AVX512VNNI__
/* acc[t] += u[t, 4q .. 4q + 3] . w for the 64 outputs of one 256-byte group; `bytes` < 4 in
   the last group where k is not a multiple of 4 (zero inputs past k, against the padding's
   zero weights). */
static inline __attribute__((always_inline)) void gemv_group(__m512i acc[][4], const int8_t *wq,
                                                              const uint8_t *u, int64_t k,
                                                              const int m, size_t bytes) {
    const __m512i w0 = _mm512_loadu_si512(wq), w1 = _mm512_loadu_si512(wq + 64);
    const __m512i w2 = _mm512_loadu_si512(wq + 128), w3 = _mm512_loadu_si512(wq + 192);
    for (int t = 0; t < m; t++) {
        int32_t four = 0;
        memcpy(&four, u + t * k, bytes);
        const __m512i x = _mm512_set1_epi32(four);
        acc[t][0] = _mm512_dpbusd_epi32(acc[t][0], x, w0);
        acc[t][1] = _mm512_dpbusd_epi32(acc[t][1], x, w1);
        acc[t][2] = _mm512_dpbusd_epi32(acc[t][2], x, w2);
        acc[t][3] = _mm512_dpbusd_epi32(acc[t][3], x, w3);
    }
}

/* m tokens (1..GEMV_ROWS, a constant where inlined) by one 64-output block. */
static inline __attribute__((always_inline)) void gemv_block(const gemv_t *g, int64_t t0,
                                                              const int m, int64_t n0) {
    const int8_t *w = g->w + n0 * g->kp;
    const uint8_t *u = g->u + t0 * g->k;
    const int64_t k = g->k, full = k / 4;
    __m512i acc[GEMV_ROWS][4];
    for (int t = 0; t < m; t++)
        for (int j = 0; j < 4; j++) acc[t][j] = _mm512_setzero_si512();
    for (int64_t q = 0; q < full; q++) gemv_group(acc, w + q * 256, u + 4 * q, k, m, 4);
    if (k % 4) gemv_group(acc, w + full * 256, u + 4 * full, k, m, k % 4);
    const int32_t *comp = (const int32_t *)(g->w + ((g->n + 63) / 64) * 64 * g->kp) + n0;
    for (int j = 0; j < 4 && n0 + 16 * j < g->n; j++) {
        const int64_t left = g->n - n0 - 16 * j;
        const __mmask16 mask = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
        const __m512i c = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mask, comp + 16 * j), 7);
        const __m512 s = _mm512_maskz_loadu_ps(mask, g->scale + n0 + 16 * j);
        for (int t = 0; t < m; t++) {
            const __m512 v = _mm512_cvtepi32_ps(_mm512_add_epi32(acc[t][j], c));
            _mm512_mask_storeu_ps(g->y + (t0 + t) * g->n + n0 + 16 * j, mask, _mm512_mul_ps(v, s));
        }
    }
}

int duquant_gemv(const gemv_t *g) {
    const int64_t blocks = (g->n + 63) / 64, tiles = (g->rows + GEMV_ROWS - 1) / GEMV_ROWS;
#pragma omp parallel for schedule(static) if (blocks > 1)
    for (int64_t i = 0; i < blocks * tiles; i++) {
        const int64_t t0 = i / blocks * GEMV_ROWS, n0 = i % blocks * 64;
        switch (g->rows - t0 < GEMV_ROWS ? g->rows - t0 : GEMV_ROWS) {
        case 1: gemv_block(g, t0, 1, n0); break;
        case 2: gemv_block(g, t0, 2, n0); break;
        case 3: gemv_block(g, t0, 3, n0); break;
        default: gemv_block(g, t0, GEMV_ROWS, n0);
        }
    }
    return 0;
}
int duquant_has_gemv(void) { return 1; }
#else /* no VNNI: oneDNN's kernel only */
int duquant_gemv(const gemv_t *g) { (void)g; return 1; }
int duquant_has_gemv(void) { return 0; }
#endif
