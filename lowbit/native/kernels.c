/* lowbit's native CPU kernels: batch-1 (and small-batch) matrix-vector products on the weight
 * layouts torch already holds for its own int8pack / int4pack kernels, so no second copy of the
 * weights exists.
 *
 * Why: at decode time (one token, M = 1) torch's _weight_int4pack_mm_for_cpu and _weight_int8pack_mm
 * unpack every weight to floats and run compute-bound, far below memory speed, on AVX2 machines. These
 * kernels instead quantize the activations to int8 in blocks of 32 (one float scale per block, as
 * llama.cpp does for its Q8_0 activations) and take integer dot products with AVX2 (maddubs / madd),
 * so the weights are read once (benchmarks/decode_speed.py reports the share of memory bandwidth reached).
 *
 * Layouts (torch 2.13, CPU):
 *   int4pack  w: uint8, [N/32][K][16]: byte j of (row block, k) holds row j in its low nibble and
 *             row j + 16 in its high nibble; codes u in 0..15.
 *             sz: bf16 [K/group][N][2] = (scale, zero) with weight = (u - 8) * scale + zero.
 *   int8pack  w: int8 [N][K] row-major; s: bf16 [N], weight = w * s.
 *
 * Threads: a small pool of its own (the caller plus n - 1 workers that spin briefly, then sleep),
 * so this library never shares an OpenMP runtime with torch's.
 *
 * Built by lowbit/native/__init__.py with the system C compiler; everything here is plain C11
 * with AVX2 + FMA intrinsics, checked at run time (lb_supported).
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define LB_MAX_THREADS 64
#ifndef LB_PREFETCH
#define LB_PREFETCH 2048 /* bytes ahead in a row block's stream */
#endif
#define LB_SPIN_ROUNDS 2000 /* pauses a worker waits for the next job (tens of microseconds) before sleeping */

int lb_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* ---------------------------------------------------------------- thread pool ------------- */
typedef void (*lb_task)(void *arg, int begin, int end);

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER; /* one caller at a time */
static atomic_int pool_gen;
static atomic_int pool_pending;
static int pool_workers; /* worker threads started */
static int pool_active = 1; /* threads per job, the caller included */
static int start_gen;
static lb_task job_fn;
static void *job_arg;
static int job_n;
static int atfork_set;

static void chunk_of(int t, int nt, int n, int *b, int *e) {
    int per = (n + nt - 1) / nt;
    *b = t * per;
    *e = *b + per;
    if (*b > n) *b = n;
    if (*e > n) *e = n;
}

static void *worker_main(void *p) {
    int t = (int)(intptr_t)p;
    int seen = start_gen;
    for (;;) {
        int g, spins = 0;
        while ((g = atomic_load_explicit(&pool_gen, memory_order_acquire)) == seen) {
            if (++spins < LB_SPIN_ROUNDS) {
                _mm_pause();
                continue;
            }
            pthread_mutex_lock(&pool_mu);
            while ((g = atomic_load_explicit(&pool_gen, memory_order_acquire)) == seen)
                pthread_cond_wait(&pool_cv, &pool_mu);
            pthread_mutex_unlock(&pool_mu);
            break;
        }
        seen = g;
        if (t < pool_active) {
            int b, e;
            chunk_of(t, pool_active, job_n, &b, &e);
            if (b < e) job_fn(job_arg, b, e);
            atomic_fetch_sub_explicit(&pool_pending, 1, memory_order_acq_rel);
        }
    }
    return NULL;
}

static void after_fork_child(void) {
    /* the workers did not survive the fork: start over, single-threaded until asked again */
    pthread_mutex_init(&pool_mu, NULL);
    pthread_cond_init(&pool_cv, NULL);
    pthread_mutex_init(&call_mu, NULL);
    pool_workers = 0;
    pool_active = 1;
}

static void set_threads(int n) {
    if (n < 1) n = 1;
    if (n > LB_MAX_THREADS) n = LB_MAX_THREADS;
    if (!atfork_set) {
        pthread_atfork(NULL, NULL, after_fork_child);
        atfork_set = 1;
    }
    if (n - 1 > pool_workers) {
        start_gen = atomic_load(&pool_gen);
        for (int t = pool_workers + 1; t < n; t++) {
            pthread_t th;
            pthread_attr_t at;
            pthread_attr_init(&at);
            pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
            if (pthread_create(&th, &at, worker_main, (void *)(intptr_t)t) != 0) {
                pthread_attr_destroy(&at);
                n = t; /* run with the threads there are */
                break;
            }
            pthread_attr_destroy(&at);
            pool_workers = t;
        }
    }
    pool_active = n;
}

static void parallel_for(lb_task fn, void *arg, int n) {
    if (pool_active <= 1 || n <= 1) {
        fn(arg, 0, n);
        return;
    }
    job_fn = fn;
    job_arg = arg;
    job_n = n;
    atomic_store_explicit(&pool_pending, pool_active - 1, memory_order_release);
    pthread_mutex_lock(&pool_mu);
    atomic_fetch_add_explicit(&pool_gen, 1, memory_order_acq_rel);
    pthread_cond_broadcast(&pool_cv);
    pthread_mutex_unlock(&pool_mu);
    int b, e;
    chunk_of(0, pool_active, n, &b, &e);
    if (b < e) fn(arg, b, e);
    while (atomic_load_explicit(&pool_pending, memory_order_acquire) > 0) _mm_pause();
}

/* ------------------------------------------------------------ activations ----------------- */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* x (M, K) float -> xq int8 in blocks of 32 with scale d per block, and the exact float sum of
 * every block (bsum) and of its codes (isum). K is a multiple of 32. */
static void quantize_rows(const float *x, int M, int K, int8_t *xq, float *d, float *bsum, int32_t *isum) {
    int nb = K / 32;
    for (int m = 0; m < M; m++) {
        for (int b = 0; b < nb; b++) {
            const float *v = x + (size_t)m * K + b * 32;
            __m256 amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
            const __m256 sign = _mm256_set1_ps(-0.0f);
            for (int i = 0; i < 32; i += 8) {
                __m256 t = _mm256_loadu_ps(v + i);
                amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, t));
                sum = _mm256_add_ps(sum, t);
            }
            float a[8], s[8];
            _mm256_storeu_ps(a, amax);
            _mm256_storeu_ps(s, sum);
            float mx = 0.f, sm = 0.f;
            for (int i = 0; i < 8; i++) {
                mx = a[i] > mx ? a[i] : mx;
                sm += s[i];
            }
            float dd = mx / 127.f, id = mx > 0.f ? 127.f / mx : 0.f;
            d[(size_t)m * nb + b] = dd;
            bsum[(size_t)m * nb + b] = sm;
            int8_t *o = xq + (size_t)m * K + b * 32;
            const __m256 vid = _mm256_set1_ps(id);
            __m256i q[4];
            for (int i = 0; i < 4; i++)  /* round to nearest even, |q| <= 127 */
                q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * i), vid));
            __m256i p01 = _mm256_packs_epi32(q[0], q[1]);
            __m256i p23 = _mm256_packs_epi32(q[2], q[3]);
            __m256i p = _mm256_packs_epi16(p01, p23);
            /* the packs interleave 128-bit lanes: put the 32 bytes back in order */
            p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)o, p);
            int32_t t = 0;
            for (int i = 0; i < 32; i++) t += o[i];
            isum[(size_t)m * nb + b] = t;
        }
    }
}

/* the int4 kernel's activation layout: per 4 k, (x_k, x_k+2) x 8 then (x_k+1, x_k+3) x 8 (32 bytes), the
 * byte pairs maddubs multiplies with the two 128-bit lanes of unpacked codes */
static void pair_up(const int8_t *q, size_t n, int8_t *out) {
    for (size_t i = 0; i < n; i += 4) {
        int8_t *o = out + i * 8;
        for (int j = 0; j < 8; j++) {
            o[2 * j] = q[i], o[2 * j + 1] = q[i + 2];
            o[16 + 2 * j] = q[i + 1], o[16 + 2 * j + 1] = q[i + 3];
        }
    }
}

/* scratch for the quantized activations, grown as needed (calls are serialised by call_mu) */
static int8_t *scr_q;
static float *scr_d, *scr_s;
static int32_t *scr_i;
static int8_t *scr_p;
static size_t scr_cap;

static int scratch(size_t elems) {
    if (elems <= scr_cap) return 0;
    int8_t *q = aligned_alloc(64, (elems + 63) / 64 * 64);
    float *d = malloc((elems / 32 + 1) * sizeof(float));
    float *s = malloc((elems / 32 + 1) * sizeof(float));
    int32_t *i = malloc((elems / 32 + 1) * sizeof(int32_t));
    int8_t *pr = aligned_alloc(64, (elems + 63) / 64 * 64 * 8);
    if (!q || !d || !s || !i || !pr) {
        free(pr);
        free(q);
        free(d);
        free(s);
        free(i);
        return -1;
    }
    free(scr_q);
    free(scr_d);
    free(scr_s);
    free(scr_i);
    free(scr_p);
    scr_p = pr;
    scr_q = q;
    scr_d = d;
    scr_s = s;
    scr_i = i;
    scr_cap = elems;
    return 0;
}

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ------------------------------------------------------------------ int4 ------------------ */
typedef struct {
    int M, K, N, group;
    const uint8_t *w;
    const uint16_t *sz;
    long sz_stride; /* elements from one group's (scale, zero) rows to the next: 2 N, or more for a slice */
    int center; /* codes are summed as (u - center): the middle of their range keeps activation rounding small */
    const int8_t *xq;
    const float *d, *bsum;
    const int32_t *isum;
    const int8_t *xpairs; /* per 4 k: (x_k, x_k+2) x 8, then (x_k+1, x_k+3) x 8 */
    float *y;
} q4_args;

static void q4_task(void *vp, int rb0, int rb1) {
    const q4_args *a = vp;
    const int K = a->K, G = a->group, ng = K / G, nb = K / 32;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    float *sp = aligned_alloc(32, (size_t)ng * 64 * sizeof(float)); /* per group: 32 scales, 32 offsets */
    if (!sp) return;
    for (int rb = rb0; rb < rb1; rb++) {
        const uint8_t *wb = a->w + (size_t)rb * K * 16;
        for (int gi = 0; gi < ng; gi++) {
            for (int p = 0; p < 32; p++) {
                const uint16_t *e = a->sz + (size_t)gi * a->sz_stride + ((size_t)rb * 32 + p) * 2;
                float s = bf16_to_f32(e[0]), z = bf16_to_f32(e[1]);
                sp[gi * 64 + p] = s;
                sp[gi * 64 + 32 + p] = z + (float)(a->center - 8) * s; /* weight = (u - c) * s + z + (c - 8) * s */
            }
        }
        for (int m = 0; m < a->M; m++) {
            const float *d = a->d + (size_t)m * nb, *bs = a->bsum + (size_t)m * nb;
            const int32_t *is = a->isum + (size_t)m * nb;
            const int8_t *xp = a->xpairs + (size_t)m * K * 8;
            /* accumulators in memory between blocks: AVX2 has 16 vector registers, the inner loop needs 15 */
            __m256 out[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int gi = 0; gi < ng; gi++) {
                __m256 gacc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
                float xsum = 0.f;
                for (int k0 = gi * G; k0 < (gi + 1) * G; k0 += 32) {
                    /* int16 sums: each maddubs lane is at most 2 * 15 * 127 = 3810, eight of them fit */
                    __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                                      _mm256_setzero_si256()};
                    for (int k = k0; k < k0 + 32; k += 4) {
                        /* 64 bytes: k, k+1, k+2, k+3 (16 each); low nibbles rows 0-15, high nibbles rows 16-31 */
                        _mm_prefetch((const char *)(wb + (size_t)k * 16 + LB_PREFETCH), _MM_HINT_T0);
                        __m256i v01 = _mm256_loadu_si256((const __m256i *)(wb + (size_t)k * 16));
                        __m256i v23 = _mm256_loadu_si256((const __m256i *)(wb + (size_t)k * 16 + 32));
                        __m256i lo01 = _mm256_and_si256(v01, low4), hi01 = _mm256_and_si256(_mm256_srli_epi16(v01, 4), low4);
                        __m256i lo23 = _mm256_and_si256(v23, low4), hi23 = _mm256_and_si256(_mm256_srli_epi16(v23, 4), low4);
                        /* byte pairs (k, k+2) in lane 0 and (k+1, k+3) in lane 1, eight rows per vector */
                        __m256i r[4] = {_mm256_unpacklo_epi8(lo01, lo23), _mm256_unpackhi_epi8(lo01, lo23),
                                        _mm256_unpacklo_epi8(hi01, hi23), _mm256_unpackhi_epi8(hi01, hi23)};
                        __m256i xb = _mm256_load_si256((const __m256i *)(xp + (size_t)k * 8));
                        for (int j = 0; j < 4; j++) acc[j] = _mm256_add_epi16(acc[j], _mm256_maddubs_epi16(r[j], xb));
                    }
                    /* rows 8j..8j+7: lane 0 + lane 1 in int32; sum (u - c) xq = sum u xq - c sum xq: with codes
                     * centred, the activations' rounding errors do not add up across a row */
                    const __m256i off = _mm256_set1_epi32(a->center * is[k0 / 32]);
                    const __m256 db = _mm256_set1_ps(d[k0 / 32]);
                    for (int j = 0; j < 4; j++) {
                        __m256i s32 = _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc[j])),
                                                       _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc[j], 1)));
                        gacc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(s32, off)), db, gacc[j]);
                    }
                    xsum += bs[k0 / 32];
                }
                __m256 xs = _mm256_set1_ps(xsum);
                for (int j = 0; j < 4; j++) {
                    out[j] = _mm256_fmadd_ps(_mm256_load_ps(sp + gi * 64 + 8 * j), gacc[j], out[j]);
                    out[j] = _mm256_fmadd_ps(_mm256_load_ps(sp + gi * 64 + 32 + 8 * j), xs, out[j]);
                }
            }
            float *y = a->y + (size_t)m * a->N + (size_t)rb * 32;
            for (int j = 0; j < 4; j++) _mm256_storeu_ps(y + 8 * j, out[j]);
        }
    }
    free(sp);
}

/* y (M, N) = x (M, K) @ W^T for torch's int4pack layout. Returns 0, or -1 (bad shape / no memory). */
int lb_q4_mm(const float *x, int M, int K, const uint8_t *w, const uint16_t *sz, long sz_stride, int N, int group,
             int center, float *y, int threads) {
    if (M < 1 || K % 32 || N % 32 || group < 32 || group % 32 || K % group || sz_stride < 2L * N || center < 0 || center > 15)
        return -1;
    pthread_mutex_lock(&call_mu);
    int rc = scratch((size_t)M * K);
    if (rc == 0) {
        quantize_rows(x, M, K, scr_q, scr_d, scr_s, scr_i);
        set_threads(threads);
        q4_args a = {M, K, N, group, w, sz, sz_stride, center, scr_q, scr_d, scr_s, scr_i, scr_p, y};
        pair_up(scr_q, (size_t)M * K, scr_p);
        parallel_for(q4_task, &a, N / 32);
    }
    pthread_mutex_unlock(&call_mu);
    return rc;
}

/* ------------------------------------------------------------------ int8 ------------------ */
typedef struct {
    int M, K, N;
    const int8_t *w;
    const uint16_t *s;
    const int8_t *xq;
    const float *d;
    float *y;
} q8_args;

/* one 32-wide block of one row: sum_k w_k * xq_k as 8 int32 lanes */
static inline __m256i q8_block(const int8_t *w, __m256i xv, __m256i ones) {
    __m256i wv = _mm256_loadu_si256((const __m256i *)w);
    /* maddubs wants one unsigned operand: |w| (w may be -128) and xq carrying w's sign */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv)), ones);
}

static void q8_task(void *vp, int r0, int r1) {
    const q8_args *a = vp;
    const int K = a->K, N = a->N, nb = K / 32;
    const __m256i ones = _mm256_set1_epi16(1);
    int n0 = r0 * 4, n1 = r1 * 4 < N ? r1 * 4 : N;
    for (int m = 0; m < a->M; m++) {
        const int8_t *xq = a->xq + (size_t)m * K;
        const float *d = a->d + (size_t)m * nb;
        float *y = a->y + (size_t)m * N;
        int n = n0;
        for (; n + 4 <= n1; n += 4) {
            const int8_t *w0 = a->w + (size_t)n * K;
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int b = 0; b < nb; b++) {
                /* the next four rows, two cache lines per block: 4 K bytes over K / 32 blocks */
                _mm_prefetch((const char *)(w0 + (size_t)4 * K + 128 * b), _MM_HINT_T0);
                _mm_prefetch((const char *)(w0 + (size_t)4 * K + 128 * b + 64), _MM_HINT_T0);
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + 32 * b));
                __m256 db = _mm256_set1_ps(d[b]);
                for (int r = 0; r < 4; r++)
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_block(w0 + (size_t)r * K + 32 * b, xv, ones)), db, acc[r]);
            }
            for (int r = 0; r < 4; r++) y[n + r] = hsum256(acc[r]) * bf16_to_f32(a->s[n + r]);
        }
        for (; n < n1; n++) {
            const int8_t *w0 = a->w + (size_t)n * K;
            __m256 acc = _mm256_setzero_ps();
            for (int b = 0; b < nb; b++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + 32 * b));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_block(w0 + 32 * b, xv, ones)), _mm256_set1_ps(d[b]), acc);
            }
            y[n] = hsum256(acc) * bf16_to_f32(a->s[n]);
        }
    }
}

/* y (M, N) = x (M, K) @ (w * s)^T for torch's int8pack layout. Returns 0, or -1. */
int lb_q8_mm(const float *x, int M, int K, const int8_t *w, const uint16_t *s, int N, float *y, int threads) {
    if (M < 1 || K % 32 || N < 1) return -1;
    pthread_mutex_lock(&call_mu);
    int rc = scratch((size_t)M * K);
    if (rc == 0) {
        quantize_rows(x, M, K, scr_q, scr_d, scr_s, scr_i);
        set_threads(threads);
        q8_args a = {M, K, N, w, s, scr_q, scr_d, y};
        parallel_for(q8_task, &a, (N + 3) / 4);
    }
    pthread_mutex_unlock(&call_mu);
    return rc;
}

/* ------------------------------------------------------------------ dense ----------------- */
typedef struct {
    int K, N, bf16;
    const void *w; /* (N, K) row-major, float32 or bf16 */
    const float *x;
    float *y;
} dense_args;

static inline __m256 load8(const void *w, int bf16, size_t i) {
    if (!bf16) return _mm256_loadu_ps((const float *)w + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static void dense_task(void *vp, int r0, int r1) {
    const dense_args *a = vp;
    const int K = a->K;
    for (int n = r0; n < r1; n++) {
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        size_t base = (size_t)n * K;
        int k = 0;
        for (; k + 16 <= K; k += 16) {
            acc0 = _mm256_fmadd_ps(load8(a->w, a->bf16, base + k), _mm256_loadu_ps(a->x + k), acc0);
            acc1 = _mm256_fmadd_ps(load8(a->w, a->bf16, base + k + 8), _mm256_loadu_ps(a->x + k + 8), acc1);
        }
        for (; k + 8 <= K; k += 8) acc0 = _mm256_fmadd_ps(load8(a->w, a->bf16, base + k), _mm256_loadu_ps(a->x + k), acc0);
        a->y[n] = hsum256(_mm256_add_ps(acc0, acc1));
    }
}

/* -------------------------------------------------------------- the decoder -------------- */
/* One decode step at batch 1, all in this file, of a Llama-layout model (llama, mistral, qwen2):
 * RMSNorm, q/k/v, rotary embedding, the float KV cache (the same buffers the Python loop fills at
 * prefill), attention over the cached positions, o, residual, RMSNorm, gate/up, SiLU, down,
 * residual; then the final norm and the head. Gemma 3 adds per-head q/k norms, norms after attention
 * and around the MLP, tanh-GELU, sliding-window layers with their own rotary table, and logit
 * soft-capping. Python does the embedding lookup (and Gemma's (1 + w) norm weights). */
enum { LIN_NONE = 0, LIN_F32 = 1, LIN_BF16 = 2, LIN_INT4 = 3, LIN_INT8 = 4 };
enum { W_Q, W_K, W_V, W_O, W_GATE, W_UP, W_DOWN, W_COUNT };

typedef struct {
    int kind, N, K, group;
    long sz_stride;
    int center;
    const void *w, *s; /* weight; int4: sz (bf16 scale/zero), int8: per-row bf16 scale */
    const float *bias; /* float32 or NULL */
    const int64_t *perm; /* act-order column permutation or NULL */
} lb_linear;

typedef struct {
    const float *in_norm, *post_norm;
    const float *pre_ff_norm, *post_ff_norm; /* Gemma 3: post_norm follows attention, these the MLP; else NULL */
    const float *q_norm, *k_norm; /* per-head norms of q and k (head_dim), or NULL */
    const float *cos, *sin; /* this layer's rotary table (max_len, head_dim) */
    int window; /* sliding window in tokens, 0: full attention */
    float *kc, *vc; /* (n_kv, max_len, head_dim) float32 */
    lb_linear w[W_COUNT];
} lb_layer;

typedef struct {
    int n_layers, hidden, n_heads, n_kv, head_dim, inter, max_len, vocab;
    float eps, scale;
    int gelu; /* MLP activation: 0 SiLU, 1 tanh-GELU */
    float softcap; /* final logit soft-capping, 0: none */
    const float *final_norm;
    lb_linear head;
    lb_layer *layers;
    float *h, *x, *q, *k, *v, *o, *g, *u, *att, *xp; /* scratch */
    const float *prep_x; /* activations now quantized in the shared scratch, and for which permutation */
    const int64_t *prep_perm;
} lb_decoder;

void lb_decoder_free(lb_decoder *d) {
    if (!d) return;
    free(d->layers);
    free(d->h);
    free(d);
}

lb_decoder *lb_decoder_new(int n_layers, int hidden, int n_heads, int n_kv, int head_dim, int inter, int max_len,
                           int vocab, float eps, float scale) {
    if (n_layers < 1 || hidden % 32 || inter % 32 || n_heads % n_kv || head_dim % 2) return NULL;
    lb_decoder *d = calloc(1, sizeof(lb_decoder));
    if (!d) return NULL;
    *d = (lb_decoder){.n_layers = n_layers, .hidden = hidden, .n_heads = n_heads, .n_kv = n_kv, .head_dim = head_dim,
                      .inter = inter, .max_len = max_len, .vocab = vocab, .eps = eps, .scale = scale};
    d->layers = calloc((size_t)n_layers, sizeof(lb_layer));
    size_t hd = (size_t)n_heads * head_dim, wide = hd > (size_t)hidden ? hd : (size_t)hidden;
    size_t n = 2 * (size_t)hidden + hd + 2 * (size_t)n_kv * head_dim + hd + 2 * (size_t)inter
             + (size_t)n_heads * max_len + (wide > (size_t)inter ? wide : (size_t)inter) + 64;
    d->h = calloc(n, sizeof(float));
    if (!d->layers || !d->h) {
        lb_decoder_free(d);
        return NULL;
    }
    d->x = d->h + hidden;
    d->q = d->x + hidden;
    d->k = d->q + hd;
    d->v = d->k + (size_t)n_kv * head_dim;
    d->o = d->v + (size_t)n_kv * head_dim;
    d->g = d->o + hd;
    d->u = d->g + inter;
    d->att = d->u + inter;
    d->xp = d->att + (size_t)n_heads * max_len;
    return d;
}

void lb_decoder_set_globals(lb_decoder *d, const float *final_norm, int gelu, float softcap) {
    d->final_norm = final_norm;
    d->gelu = gelu;
    d->softcap = softcap;
}

void lb_decoder_set_layer(lb_decoder *d, int i, const float *in_norm, const float *post_norm, const float *pre_ff_norm,
                          const float *post_ff_norm, const float *q_norm, const float *k_norm, const float *cos,
                          const float *sin, int window, float *kc, float *vc) {
    lb_layer *L = &d->layers[i];
    *L = (lb_layer){.in_norm = in_norm, .post_norm = post_norm, .pre_ff_norm = pre_ff_norm, .post_ff_norm = post_ff_norm,
                    .q_norm = q_norm, .k_norm = k_norm, .cos = cos, .sin = sin, .window = window, .kc = kc, .vc = vc};
}

/* layer -1: the head */
int lb_decoder_set_linear(lb_decoder *d, int layer, int which, int kind, int N, int K, int group, long sz_stride,
                          int center, const void *w, const void *s, const float *bias, const int64_t *perm) {
    if (layer < -1 || layer >= d->n_layers || which < 0 || which >= W_COUNT) return -1;
    if (kind == LIN_INT4 && (K % 32 || N % 32 || group < 32 || group % 32 || K % group || sz_stride < 2L * N
                             || center < 0 || center > 15))
        return -1;
    if (kind == LIN_INT8 && K % 32) return -1;
    if ((kind == LIN_F32 || kind == LIN_BF16) && (K % 8 || perm)) return -1;
    if (kind < LIN_F32 || kind > LIN_INT8) return -1;
    lb_linear *l = layer < 0 ? &d->head : &d->layers[layer].w[which];
    *l = (lb_linear){kind, N, K, group, sz_stride, center, w, s, bias, perm};
    return 0;
}

/* quantize x (K) into the shared scratch for the integer kernels, unless it already is */
static void prep_act(lb_decoder *d, const float *x, int K, const int64_t *perm) {
    if (d->prep_x == x && d->prep_perm == perm) return;
    const float *src = x;
    if (perm) {
        for (int i = 0; i < K; i++) d->xp[i] = x[perm[i]];
        src = d->xp;
    }
    quantize_rows(src, 1, K, scr_q, scr_d, scr_s, scr_i);
    pair_up(scr_q, (size_t)K, scr_p);
    d->prep_x = x;
    d->prep_perm = perm;
}

static void linear(lb_decoder *d, const lb_linear *l, const float *x, float *y) {
    if (l->kind == LIN_F32 || l->kind == LIN_BF16) {
        dense_args a = {l->K, l->N, l->kind == LIN_BF16, l->w, x, y};
        parallel_for(dense_task, &a, l->N);
    } else if (l->kind == LIN_INT4) {
        prep_act(d, x, l->K, l->perm);
        q4_args a = {1, l->K, l->N, l->group, l->w, l->s, l->sz_stride, l->center, scr_q, scr_d, scr_s, scr_i, scr_p, y};
        parallel_for(q4_task, &a, l->N / 32);
    } else {
        prep_act(d, x, l->K, l->perm);
        q8_args a = {1, l->K, l->N, l->w, l->s, scr_q, scr_d, y};
        parallel_for(q8_task, &a, (l->N + 3) / 4);
    }
    if (l->bias)
        for (int i = 0; i < l->N; i++) y[i] += l->bias[i];
}

static void rmsnorm(const float *h, const float *w, float *x, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)h[i] * h[i];
    float r = (float)(1.0 / sqrt(ss / n + eps));
    for (int i = 0; i < n; i++) x[i] = h[i] * r * w[i];
}

static void rope(float *v, const float *cos, const float *sin, int D) {
    int half = D / 2;
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

typedef struct {
    lb_decoder *d;
    const lb_layer *L;
    int pos;
} attn_args;

static void attn_task(void *vp, int h0, int h1) {
    const attn_args *a = vp;
    const lb_decoder *d = a->d;
    const int D = d->head_dim, group = d->n_heads / d->n_kv;
    /* keys lo..pos: all of them, or the last `window` */
    const int lo = a->L->window > 0 && a->pos + 1 > a->L->window ? a->pos + 1 - a->L->window : 0, T = a->pos + 1 - lo;
    for (int hh = h0; hh < h1; hh++) {
        const float *q = d->q + (size_t)hh * D;
        const float *kc = a->L->kc + ((size_t)(hh / group) * d->max_len + lo) * D;
        const float *vc = a->L->vc + ((size_t)(hh / group) * d->max_len + lo) * D;
        float *s = d->att + (size_t)hh * d->max_len, mx = -INFINITY;
        for (int t = 0; t < T; t++) {
            __m256 acc = _mm256_setzero_ps();
            int i = 0;
            for (; i + 8 <= D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(kc + (size_t)t * D + i), acc);
            float dot = hsum256(acc);
            for (; i < D; i++) dot += q[i] * kc[(size_t)t * D + i];
            s[t] = dot * d->scale;
            mx = s[t] > mx ? s[t] : mx;
        }
        float sum = 0.f;
        for (int t = 0; t < T; t++) {
            s[t] = expf(s[t] - mx);
            sum += s[t];
        }
        float *o = d->o + (size_t)hh * D, inv = 1.f / sum;
        for (int i = 0; i < D; i++) o[i] = 0.f;
        for (int t = 0; t < T; t++) {
            float p = s[t] * inv;
            const float *vr = vc + (size_t)t * D;
            int i = 0;
            for (; i + 8 <= D; i += 8)
                _mm256_storeu_ps(o + i, _mm256_fmadd_ps(_mm256_set1_ps(p), _mm256_loadu_ps(vr + i), _mm256_loadu_ps(o + i)));
            for (; i < D; i++) o[i] += p * vr[i];
        }
    }
}

/* one token: h_in (hidden) is its embedding, pos its position; writes logits (vocab) */
int lb_decoder_step(lb_decoder *d, const float *h_in, int pos, float *logits, int threads) {
    if (pos < 0 || pos >= d->max_len) return -1;
    const int Hd = d->hidden, D = d->head_dim;
    pthread_mutex_lock(&call_mu);
    int wide = Hd > d->inter ? Hd : d->inter;
    if (scratch((size_t)wide) != 0) {
        pthread_mutex_unlock(&call_mu);
        return -2;
    }
    set_threads(threads);
    memcpy(d->h, h_in, sizeof(float) * Hd);
    for (int li = 0; li < d->n_layers; li++) {
        const lb_layer *L = &d->layers[li];
        const float *cos = L->cos + (size_t)pos * D, *sin = L->sin + (size_t)pos * D;
        rmsnorm(d->h, L->in_norm, d->x, Hd, d->eps);
        d->prep_x = NULL;
        linear(d, &L->w[W_Q], d->x, d->q);
        linear(d, &L->w[W_K], d->x, d->k);
        linear(d, &L->w[W_V], d->x, d->v);
        for (int hh = 0; hh < d->n_heads; hh++) {
            float *q = d->q + (size_t)hh * D;
            if (L->q_norm) rmsnorm(q, L->q_norm, q, D, d->eps);
            rope(q, cos, sin, D);
        }
        for (int hh = 0; hh < d->n_kv; hh++) {
            float *k = d->k + (size_t)hh * D;
            if (L->k_norm) rmsnorm(k, L->k_norm, k, D, d->eps);
            rope(k, cos, sin, D);
            memcpy(L->kc + ((size_t)hh * d->max_len + pos) * D, k, sizeof(float) * D);
            memcpy(L->vc + ((size_t)hh * d->max_len + pos) * D, d->v + (size_t)hh * D, sizeof(float) * D);
        }
        attn_args aa = {d, L, pos};
        parallel_for(attn_task, &aa, d->n_heads);
        linear(d, &L->w[W_O], d->o, d->x);
        if (L->pre_ff_norm) { /* Gemma 3: h += norm(attention); x = norm(h) */
            rmsnorm(d->x, L->post_norm, d->x, Hd, d->eps);
            for (int i = 0; i < Hd; i++) d->h[i] += d->x[i];
            rmsnorm(d->h, L->pre_ff_norm, d->x, Hd, d->eps);
        } else {
            for (int i = 0; i < Hd; i++) d->h[i] += d->x[i];
            rmsnorm(d->h, L->post_norm, d->x, Hd, d->eps);
        }
        d->prep_x = NULL;
        linear(d, &L->w[W_GATE], d->x, d->g);
        linear(d, &L->w[W_UP], d->x, d->u);
        if (d->gelu) {
            for (int i = 0; i < d->inter; i++) {
                float g = d->g[i];
                d->g[i] = 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g))) * d->u[i];
            }
        } else {
            for (int i = 0; i < d->inter; i++) d->g[i] = d->g[i] / (1.f + expf(-d->g[i])) * d->u[i];
        }
        d->prep_x = NULL;
        linear(d, &L->w[W_DOWN], d->g, d->x);
        if (L->post_ff_norm) rmsnorm(d->x, L->post_ff_norm, d->x, Hd, d->eps);
        for (int i = 0; i < Hd; i++) d->h[i] += d->x[i];
    }
    rmsnorm(d->h, d->final_norm, d->x, Hd, d->eps);
    d->prep_x = NULL;
    linear(d, &d->head, d->x, logits);
    d->prep_x = NULL;
    if (d->softcap > 0.f)
        for (int i = 0; i < d->vocab; i++) logits[i] = tanhf(logits[i] / d->softcap) * d->softcap;
    pthread_mutex_unlock(&call_mu);
    return 0;
}

/* --------------------------------------------------------- int4 -> float ------------------ */
/* Many rows at once (prefill) are compute-bound: there a float GEMM on weights dequantized once per
 * call beats unpacking nibbles for every row. Writes wt (K, N) row-major: row k holds every output
 * row's weight for input k, so each 16-byte group of the int4pack layout fills 32 adjacent floats. */
typedef struct {
    int K, N, group;
    const uint8_t *w;
    const uint16_t *sz;
    long sz_stride;
    float *wt;
} deq4_args;

static void deq4_task(void *vp, int rb0, int rb1) {
    const deq4_args *a = vp;
    const int K = a->K, N = a->N, G = a->group;
    for (int rb = rb0; rb < rb1; rb++) {
        const uint8_t *wb = a->w + (size_t)rb * K * 16;
        for (int gi = 0; gi < K / G; gi++) {
            float s[32], m[32];
            for (int p = 0; p < 32; p++) {
                const uint16_t *e = a->sz + (size_t)gi * a->sz_stride + ((size_t)rb * 32 + p) * 2;
                s[p] = bf16_to_f32(e[0]);
                m[p] = bf16_to_f32(e[1]) - 8.f * s[p]; /* (u - 8) * s + z = u * s + (z - 8 s) */
            }
            __m256 vs[4], vm[4];
            for (int j = 0; j < 4; j++) {
                vs[j] = _mm256_loadu_ps(s + 8 * j);
                vm[j] = _mm256_loadu_ps(m + 8 * j);
            }
            for (int k = gi * G; k < (gi + 1) * G; k++) {
                __m128i b = _mm_loadu_si128((const __m128i *)(wb + (size_t)k * 16));
                __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
                __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
                __m128i u[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)}; /* rows 0-7, 8-15, 16-23, 24-31 */
                float *out = a->wt + (size_t)k * N + (size_t)rb * 32;
                for (int j = 0; j < 4; j++)
                    _mm256_storeu_ps(out + 8 * j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(u[j])), vs[j], vm[j]));
            }
        }
    }
}

int lb_q4_dequant_t(const uint8_t *w, const uint16_t *sz, long sz_stride, int N, int K, int group, float *wt, int threads) {
    if (K % 32 || N % 32 || group < 32 || group % 32 || K % group || sz_stride < 2L * N) return -1;
    pthread_mutex_lock(&call_mu);
    set_threads(threads);
    deq4_args a = {K, N, group, w, sz, sz_stride, wt};
    parallel_for(deq4_task, &a, N / 32);
    pthread_mutex_unlock(&call_mu);
    return 0;
}
