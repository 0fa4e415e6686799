/* lowbit's native CPU kernels: small-batch matrix products on weight layouts that lowbit itself
 * defines and packs (lowbit/native/layout.py), and a whole batch-1 decode step.
 *
 * Why: at decode time (one token) a product must read its weights at memory speed. These kernels
 * round the activations to int8 in blocks of 32 (one float scale per block, as llama.cpp does for its
 * Q8_0 activations) and take integer dot products, so each weight byte is read once.
 *
 * The layouts are lowbit's, never torch's (torch packs its int4/int8 tensors differently per
 * instruction set and release). Both are documented in docs/ARCHITECTURE.md ("Native layouts"):
 *
 *   q4  codes  uint8 [N/32][K/8][32][4]: for row block rb, column chunk kc (8 inputs) and row r of
 *              the block, byte j (0..3) holds the code of input kc*8 + j in its low nibble and of input
 *              kc*8 + 4 + j in its high nibble. One chunk of one block is 128 bytes (32 rows x 8 inputs).
 *       params fp16 or fp32 [N/32][K/G][2][32]: per row block and group of G inputs, 32 scales then 32
 *              offsets; weight = code * scale + offset (codes 0..15).
 *   q8  codes  int8 [N][K] row-major (the stored codes themselves); scales fp32 [N]; weight = code * scale.
 *
 * One source, built once per instruction set (lowbit/native/__init__.py picks one per process):
 *   LB_AVX512 + LB_VNNI  AVX-512 F/BW/VL with VNNI's u8 x s8 dot products (vpdpbusd)
 *   LB_AVX512            AVX-512 F/BW/VL, maddubs + madd
 *   LB_AVX2              AVX2 + FMA + F16C
 *   (none)               portable C, no intrinsics: correct on any CPU the compiler targets
 * Every path computes the same integer sums. int4 products then apply the same float operations in the
 * same order, so every path returns the same floats; int8 and float products differ by summation order.
 *
 * Threads: a small pool of its own (the caller plus n - 1 workers that spin briefly, then sleep),
 * so this library never shares an OpenMP runtime with torch's.
 */
#if defined(__x86_64__) || defined(__i386__)
#define LB_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(LB_AVX512) && !defined(LB_AVX2)
#error "LB_AVX512 builds on LB_AVX2"
#endif
#if defined(LB_VNNI) && !defined(LB_AVX512)
#error "LB_VNNI builds on LB_AVX512"
#endif

#if defined(LB_AVX512) && defined(LB_VNNI)
#define LB_ISA 3
#elif defined(LB_AVX512)
#define LB_ISA 2
#elif defined(LB_AVX2)
#define LB_ISA 1
#else
#define LB_ISA 0
#endif

#if defined(LB_X86)
#define LB_PAUSE() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define LB_PAUSE() __asm__ __volatile__("yield")
#else
#define LB_PAUSE() ((void)0)
#endif

#define LB_MAX_THREADS 64
#ifndef LB_PREFETCH
#define LB_PREFETCH 2048 /* bytes ahead in a row block's stream */
#endif
#define LB_SPIN_ROUNDS 2000 /* pauses a worker waits for the next job (tens of microseconds) before sleeping */

/* ------------------------------------------------------------- the CPU ------------------- */
enum { F_AVX2 = 1, F_FMA = 2, F_F16C = 4, F_AVX512F = 8, F_AVX512BW = 16, F_AVX512VL = 32, F_VNNI = 64 };

/* What the CPU and the OS support, from cpuid and xgetbv (0 off x86). */
int lb_cpu_features(void) {
#if defined(LB_X86)
    unsigned a, b, c, d;
    int f = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
    if (!osxsave || !avx) return 0;
    unsigned lo, hi;
    __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0x6) != 0x6) return 0; /* the OS does not save YMM state */
    if ((c >> 12) & 1) f |= F_FMA;
    if ((c >> 29) & 1) f |= F_F16C;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
    if ((b >> 5) & 1) f |= F_AVX2;
    if ((lo & 0xE0) == 0xE0) { /* opmask and ZMM state saved */
        if ((b >> 16) & 1) f |= F_AVX512F;
        if ((b >> 30) & 1) f |= F_AVX512BW;
        if ((b >> 31) & 1) f |= F_AVX512VL;
        if ((c >> 11) & 1) f |= F_VNNI;
    }
    return f;
#else
    return 0;
#endif
}

/* Which path this build is (0 generic, 1 avx2, 2 avx512, 3 avx512vnni). */
int lb_isa(void) { return LB_ISA; }

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
                LB_PAUSE();
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
    while (atomic_load_explicit(&pool_pending, memory_order_acquire) > 0) LB_PAUSE();
}

/* ------------------------------------------------------------ conversions ----------------- */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* IEEE half -> float, portable (normals, subnormals, inf, nan) */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, u;
    if (exp == 0x1F) {
        u = sign | 0x7F800000u | (man << 13);
    } else if (exp) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) { /* subnormal: value man * 2^-24 */
        float f = (float)man * 5.9604644775390625e-8f;
        memcpy(&u, &f, 4);
        u |= sign;
    } else {
        u = sign;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ------------------------------------------------------------ activations ----------------- */
/* x (M, K) float -> xq int8 in blocks of 32 with scale d per block (and in dx, repeated 8 times: the
 * int8 kernel's lanes), the float sum of every block (bsum) and the sum of its codes (isum). K is a
 * multiple of 32. Rounding: to nearest, ties to even. */
static void quantize_rows(const float *x, int M, int K, int8_t *xq, float *d, float *dx, float *bsum, int32_t *isum) {
    int nb = K / 32;
    for (int m = 0; m < M; m++) {
        for (int b = 0; b < nb; b++) {
            const float *v = x + (size_t)m * K + b * 32;
            int8_t *o = xq + (size_t)m * K + b * 32;
            float mx = 0.f, sm = 0.f;
#if defined(LB_AVX2)
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
            for (int i = 0; i < 8; i++) {
                mx = a[i] > mx ? a[i] : mx;
                sm += s[i];
            }
            float id = mx > 0.f ? 127.f / mx : 0.f;
            const __m256 vid = _mm256_set1_ps(id);
            __m256i q[4];
            for (int i = 0; i < 4; i++) /* round to nearest even, |q| <= 127 */
                q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * i), vid));
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            /* the packs interleave 128-bit lanes: put the 32 bytes back in order */
            p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)o, p);
#else
            float a[8] = {0}, s[8] = {0}; /* the same summation order as the vector path */
            for (int i = 0; i < 32; i++) {
                float t = fabsf(v[i]);
                a[i % 8] = t > a[i % 8] ? t : a[i % 8];
                s[i % 8] += v[i];
            }
            for (int i = 0; i < 8; i++) {
                mx = a[i] > mx ? a[i] : mx;
                sm += s[i];
            }
            float id = mx > 0.f ? 127.f / mx : 0.f;
            for (int i = 0; i < 32; i++) {
                float r = nearbyintf(v[i] * id);
                o[i] = (int8_t)(r > 127.f ? 127.f : (r < -127.f ? -127.f : r));
            }
#endif
            d[(size_t)m * nb + b] = mx / 127.f;
            for (int l = 0; l < 8; l++) dx[((size_t)m * nb + b) * 8 + l] = mx / 127.f;
            bsum[(size_t)m * nb + b] = sm;
            int32_t t = 0;
            for (int i = 0; i < 32; i++) t += o[i];
            isum[(size_t)m * nb + b] = t;
        }
    }
}

/* scratch for the quantized activations, grown as needed (calls are serialised by call_mu) */
static int8_t *scr_q;
static float *scr_d, *scr_s, *scr_dx; /* scr_dx: every block's d repeated 8 times (the int8 kernel's lanes) */
static int32_t *scr_i;
static size_t scr_cap;

static int scratch(size_t elems) {
    if (elems <= scr_cap) return 0;
    size_t nb = elems / 32 + 1;
    int8_t *q = aligned_alloc(64, (elems + 63) / 64 * 64);
    float *d = malloc(nb * sizeof(float));
    float *s = malloc(nb * sizeof(float));
    float *dx = malloc(nb * 8 * sizeof(float) + 64);
    int32_t *i = malloc(nb * sizeof(int32_t));
    if (!q || !d || !s || !i || !dx) {
        free(q);
        free(d);
        free(s);
        free(dx);
        free(i);
        return -1;
    }
    free(scr_q);
    free(scr_d);
    free(scr_s);
    free(scr_dx);
    free(scr_i);
    scr_q = q;
    scr_d = d;
    scr_s = s;
    scr_dx = dx;
    scr_i = i;
    scr_cap = elems;
    return 0;
}

#if defined(LB_AVX2)
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* ------------------------------------------------------------------ int4 ------------------ */
typedef struct {
    int M, K, N, group;
    const uint8_t *w; /* [N/32][K/8][32][4] */
    const void *p; /* [N/32][K/G][2][32] fp16 or fp32 */
    int p_f32;
    int center; /* codes are summed as (u - center): the middle of their range keeps activation rounding small */
    const int8_t *xq;
    const float *d, *bsum;
    const int32_t *isum;
    float *y;
} q4_args;

/* every group's 32 scales and 32 offsets of row block rb as floats, into sp (groups x 64); offsets moved
 * by center * scale (sum u x = sum (u - c) x + c sum x). Once per row block, for all activation rows. */
static void q4_params(const q4_args *a, int rb, float *sp) {
    const int ng = a->K / a->group;
    const size_t at = (size_t)rb * ng * 64;
    const float c = (float)a->center;
    for (int gi = 0; gi < ng; gi++) {
        float *sc = sp + (size_t)gi * 64, *of = sc + 32;
        int r = 0;
#if defined(LB_AVX2)
        const __m256 vc = _mm256_set1_ps(c);
        for (; r < 32; r += 8) {
            __m256 s, o;
            if (a->p_f32) {
                s = _mm256_loadu_ps((const float *)a->p + at + gi * 64 + r);
                o = _mm256_loadu_ps((const float *)a->p + at + gi * 64 + 32 + r);
            } else {
                s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)a->p + at + gi * 64 + r)));
                o = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)a->p + at + gi * 64 + 32 + r)));
            }
            _mm256_storeu_ps(sc + r, s);
            _mm256_storeu_ps(of + r, _mm256_fmadd_ps(vc, s, o));
        }
#endif
        for (; r < 32; r++) {
            float sv, ov;
            if (a->p_f32) {
                sv = ((const float *)a->p)[at + gi * 64 + r];
                ov = ((const float *)a->p)[at + gi * 64 + 32 + r];
            } else {
                sv = f16_to_f32(((const uint16_t *)a->p)[at + gi * 64 + r]);
                ov = f16_to_f32(((const uint16_t *)a->p)[at + gi * 64 + 32 + r]);
            }
            sc[r] = sv;
            of[r] = fmaf(c, sv, ov); /* one rounding, as the vector paths' fmadd */
        }
    }
}

/* one row block (32 rows of W) times activation row m: y[0..31] */
#if defined(LB_AVX512)
static inline void q4_block(const q4_args *a, const uint8_t *wb, const float *sp, int m, float *y) {
    const int K = a->K, G = a->group, ng = K / G, nb = K / 32;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
#if !defined(LB_VNNI)
    const __m512i ones = _mm512_set1_epi16(1);
#endif
    const float *d = a->d + (size_t)m * nb, *bs = a->bsum + (size_t)m * nb;
    const int32_t *is = a->isum + (size_t)m * nb;
    const int8_t *xq = a->xq + (size_t)m * K;
    __m512 out0 = _mm512_setzero_ps(), out1 = _mm512_setzero_ps();
    for (int gi = 0; gi < ng; gi++) {
        __m512 g0 = _mm512_setzero_ps(), g1 = _mm512_setzero_ps();
        float xsum = 0.f;
        for (int k0 = gi * G; k0 < (gi + 1) * G; k0 += 32) {
            __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
            for (int k = k0; k < k0 + 32; k += 8) {
                const uint8_t *c = wb + (size_t)k * 16; /* chunk k / 8: 128 bytes */
                _mm_prefetch((const char *)(c + LB_PREFETCH), _MM_HINT_T0);
                _mm_prefetch((const char *)(c + LB_PREFETCH + 64), _MM_HINT_T0);
                int32_t x0, x1;
                memcpy(&x0, xq + k, 4);
                memcpy(&x1, xq + k + 4, 4);
                const __m512i xa = _mm512_set1_epi32(x0), xb = _mm512_set1_epi32(x1);
                __m512i v0 = _mm512_loadu_si512((const void *)c), v1 = _mm512_loadu_si512((const void *)(c + 64));
                __m512i lo0 = _mm512_and_si512(v0, low4), hi0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), low4);
                __m512i lo1 = _mm512_and_si512(v1, low4), hi1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), low4);
#if defined(LB_VNNI)
                /* each int32 lane is one row: its 4 codes times 4 activations */
                acc0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc0, lo0, xa), hi0, xb);
                acc1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc1, lo1, xa), hi1, xb);
#else
                /* int16 sums: each maddubs lane is at most 2 * 15 * 127 = 3810, eight of them fit */
                acc0 = _mm512_add_epi16(acc0, _mm512_add_epi16(_mm512_maddubs_epi16(lo0, xa), _mm512_maddubs_epi16(hi0, xb)));
                acc1 = _mm512_add_epi16(acc1, _mm512_add_epi16(_mm512_maddubs_epi16(lo1, xa), _mm512_maddubs_epi16(hi1, xb)));
#endif
            }
#if !defined(LB_VNNI)
            acc0 = _mm512_madd_epi16(acc0, ones);
            acc1 = _mm512_madd_epi16(acc1, ones);
#endif
            const __m512i off = _mm512_set1_epi32(a->center * is[k0 / 32]);
            const __m512 db = _mm512_set1_ps(d[k0 / 32]);
            g0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc0, off)), db, g0);
            g1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc1, off)), db, g1);
            xsum += bs[k0 / 32];
        }
        const float *sc = sp + (size_t)gi * 64, *of = sc + 32;
        const __m512 xs = _mm512_set1_ps(xsum);
        out0 = _mm512_fmadd_ps(_mm512_load_ps(sc), g0, _mm512_fmadd_ps(_mm512_load_ps(of), xs, out0));
        out1 = _mm512_fmadd_ps(_mm512_load_ps(sc + 16), g1, _mm512_fmadd_ps(_mm512_load_ps(of + 16), xs, out1));
    }
    _mm512_storeu_ps(y, out0);
    _mm512_storeu_ps(y + 16, out1);
}
#elif defined(LB_AVX2)
static inline void q4_block(const q4_args *a, const uint8_t *wb, const float *sp, int m, float *y) {
    const int K = a->K, G = a->group, ng = K / G, nb = K / 32;
    const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const float *d = a->d + (size_t)m * nb, *bs = a->bsum + (size_t)m * nb;
    const int32_t *is = a->isum + (size_t)m * nb;
    const int8_t *xq = a->xq + (size_t)m * K;
    /* accumulators in memory between groups: AVX2 has 16 vector registers */
    __m256 out[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int gi = 0; gi < ng; gi++) {
        __m256 gacc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        float xsum = 0.f;
        for (int k0 = gi * G; k0 < (gi + 1) * G; k0 += 32) {
            /* int16 sums: each maddubs lane is at most 2 * 15 * 127 = 3810, eight of them fit */
            __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                              _mm256_setzero_si256()};
            for (int k = k0; k < k0 + 32; k += 8) {
                const uint8_t *c = wb + (size_t)k * 16;
                _mm_prefetch((const char *)(c + LB_PREFETCH), _MM_HINT_T0);
                _mm_prefetch((const char *)(c + LB_PREFETCH + 64), _MM_HINT_T0);
                int32_t x0, x1;
                memcpy(&x0, xq + k, 4);
                memcpy(&x1, xq + k + 4, 4);
                const __m256i xa = _mm256_set1_epi32(x0), xb = _mm256_set1_epi32(x1);
                for (int j = 0; j < 4; j++) { /* rows 8j .. 8j + 7 */
                    __m256i v = _mm256_loadu_si256((const __m256i *)(c + 32 * j));
                    __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                    acc[j] = _mm256_add_epi16(acc[j], _mm256_add_epi16(_mm256_maddubs_epi16(lo, xa),
                                                                       _mm256_maddubs_epi16(hi, xb)));
                }
            }
            const __m256i off = _mm256_set1_epi32(a->center * is[k0 / 32]);
            const __m256 db = _mm256_set1_ps(d[k0 / 32]);
            for (int j = 0; j < 4; j++)
                gacc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_madd_epi16(acc[j], ones), off)),
                                          db, gacc[j]);
            xsum += bs[k0 / 32];
        }
        const float *sc = sp + (size_t)gi * 64, *of = sc + 32;
        const __m256 xs = _mm256_set1_ps(xsum);
        for (int j = 0; j < 4; j++)
            out[j] = _mm256_fmadd_ps(_mm256_load_ps(sc + 8 * j), gacc[j], _mm256_fmadd_ps(_mm256_load_ps(of + 8 * j), xs, out[j]));
    }
    for (int j = 0; j < 4; j++) _mm256_storeu_ps(y + 8 * j, out[j]);
}
#else
static inline void q4_block(const q4_args *a, const uint8_t *wb, const float *sp, int m, float *y) {
    const int K = a->K, G = a->group, ng = K / G, nb = K / 32;
    const float *d = a->d + (size_t)m * nb, *bs = a->bsum + (size_t)m * nb;
    const int32_t *is = a->isum + (size_t)m * nb;
    const int8_t *xq = a->xq + (size_t)m * K;
    float out[32] = {0}, gacc[32];
    int32_t acc[32];
    for (int gi = 0; gi < ng; gi++) {
        float xsum = 0.f;
        for (int r = 0; r < 32; r++) gacc[r] = 0.f;
        for (int k0 = gi * G; k0 < (gi + 1) * G; k0 += 32) {
            for (int r = 0; r < 32; r++) acc[r] = 0;
            for (int k = k0; k < k0 + 32; k += 8) {
                const uint8_t *c = wb + (size_t)k * 16;
                for (int r = 0; r < 32; r++)
                    for (int j = 0; j < 4; j++)
                        acc[r] += (c[4 * r + j] & 15) * xq[k + j] + (c[4 * r + j] >> 4) * xq[k + 4 + j];
            }
            /* the vector paths' operations in their order (fused multiply-adds): the same floats */
            const int32_t off = a->center * is[k0 / 32];
            for (int r = 0; r < 32; r++) gacc[r] = fmaf((float)(acc[r] - off), d[k0 / 32], gacc[r]);
            xsum += bs[k0 / 32];
        }
        const float *sc = sp + (size_t)gi * 64, *of = sc + 32;
        for (int r = 0; r < 32; r++) out[r] = fmaf(sc[r], gacc[r], fmaf(of[r], xsum, out[r]));
    }
    for (int r = 0; r < 32; r++) y[r] = out[r];
}
#endif

static void q4_task(void *vp, int rb0, int rb1) {
    const q4_args *a = vp;
    float *sp = aligned_alloc(64, (size_t)(a->K / a->group) * 64 * sizeof(float)); /* a multiple of 64 bytes */
    if (!sp) { /* out of memory: NaN outputs, never plausible garbage */
        for (int m = 0; m < a->M; m++)
            for (int n = rb0 * 32; n < rb1 * 32; n++) a->y[(size_t)m * a->N + n] = NAN;
        return;
    }
    for (int rb = rb0; rb < rb1; rb++) {
        const uint8_t *wb = a->w + (size_t)rb * a->K * 16;
        q4_params(a, rb, sp);
        for (int m = 0; m < a->M; m++) q4_block(a, wb, sp, m, a->y + (size_t)m * a->N + (size_t)rb * 32);
    }
    free(sp);
}

static int q4_shape_ok(int K, int N, int group, int center) {
    return K > 0 && N > 0 && K % 32 == 0 && N % 32 == 0 && group >= 32 && group % 32 == 0 && K % group == 0
           && center >= 0 && center <= 15;
}

/* y (M, N) = x (M, K) @ W^T for the q4 layout. Returns 0, or -1 (bad shape / no memory). */
int lb_q4_mm(const float *x, int M, int K, const uint8_t *w, const void *p, int p_f32, int N, int group, int center,
             float *y, int threads) {
    if (M < 1 || !q4_shape_ok(K, N, group, center)) return -1;
    pthread_mutex_lock(&call_mu);
    int rc = scratch((size_t)M * K);
    if (rc == 0) {
        quantize_rows(x, M, K, scr_q, scr_d, scr_dx, scr_s, scr_i);
        set_threads(threads);
        q4_args a = {M, K, N, group, w, p, p_f32, center, scr_q, scr_d, scr_s, scr_i, y};
        parallel_for(q4_task, &a, N / 32);
    }
    pthread_mutex_unlock(&call_mu);
    return rc;
}

/* ------------------------------------------------------------------ int8 ------------------ */
typedef struct {
    int M, K, N;
    const int8_t *w; /* (N, K) row-major */
    const float *s; /* (N) */
    const int8_t *xq;
    const float *d, *dx;
    float *y;
} q8_args;

#define Q8_ROWS 4 /* rows of W per task unit: each weight row is read once for all M activation rows */

#if defined(LB_AVX2)
/* one 32-wide block of one row: sum_k w_k * xq_k as 8 int32 lanes */
static inline __m256i q8_block(const int8_t *w, __m256i xv, __m256i ones) {
    __m256i wv = _mm256_loadu_si256((const __m256i *)w);
    /* maddubs wants one unsigned operand: |w| (w may be -128, read as 128 unsigned) and xq carrying w's sign */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv)), ones);
}
#endif

static void q8_task(void *vp, int u0, int u1) {
    const q8_args *a = vp;
    const int K = a->K, N = a->N, nb = K / 32;
    int n0 = u0 * Q8_ROWS, n1 = u1 * Q8_ROWS < N ? u1 * Q8_ROWS : N;
    for (int n = n0; n < n1; n++) {
        const int8_t *wr = a->w + (size_t)n * K;
#if defined(LB_AVX2)
        _mm_prefetch((const char *)(wr + (size_t)Q8_ROWS * K), _MM_HINT_T0);
#endif
        for (int m = 0; m < a->M; m++) {
            const int8_t *xq = a->xq + (size_t)m * K;
            const float *d = a->d + (size_t)m * nb;
            float acc;
#if defined(LB_AVX512)
            const float *dx = a->dx + (size_t)m * nb * 8;
            __m512 acc512 = _mm512_setzero_ps();
            int b = 0;
            for (; b + 2 <= nb; b += 2) { /* two blocks per vector: lanes 0-7 block b, 8-15 block b + 1 */
                _mm_prefetch((const char *)(wr + 32 * b + LB_PREFETCH), _MM_HINT_T0);
                __m512i wv = _mm512_loadu_si512((const void *)(wr + 32 * b));
                __m512i xv = _mm512_loadu_si512((const void *)(xq + 32 * b));
                __mmask64 neg = _mm512_movepi8_mask(wv);
                __m512i xs = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv); /* x carrying w's sign */
                __m512i wa = _mm512_abs_epi8(wv); /* -128 reads as 128 unsigned */
#if defined(LB_VNNI)
                __m512i s32 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wa, xs);
#else
                __m512i s32 = _mm512_madd_epi16(_mm512_maddubs_epi16(wa, xs), _mm512_set1_epi16(1));
#endif
                acc512 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s32), _mm512_loadu_ps(dx + 8 * b), acc512);
            }
            acc = _mm512_reduce_add_ps(acc512);
            if (b < nb) {
                __m256i s32 = q8_block(wr + 32 * b, _mm256_loadu_si256((const __m256i *)(xq + 32 * b)), _mm256_set1_epi16(1));
                acc += hsum256(_mm256_cvtepi32_ps(s32)) * d[b];
            }
#elif defined(LB_AVX2)
            const __m256i ones = _mm256_set1_epi16(1);
            __m256 acc256 = _mm256_setzero_ps();
            for (int b = 0; b < nb; b++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + 32 * b));
                acc256 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_block(wr + 32 * b, xv, ones)), _mm256_set1_ps(d[b]), acc256);
            }
            acc = hsum256(acc256);
#else
            acc = 0.f;
            for (int b = 0; b < nb; b++) {
                int32_t s = 0;
                for (int i = 0; i < 32; i++) s += (int32_t)wr[32 * b + i] * xq[32 * b + i];
                acc += (float)s * d[b];
            }
#endif
            a->y[(size_t)m * N + n] = acc * a->s[n];
        }
    }
}

/* y (M, N) = x (M, K) @ (w * s)^T for the q8 layout. Returns 0, or -1. */
int lb_q8_mm(const float *x, int M, int K, const int8_t *w, const float *s, int N, float *y, int threads) {
    if (M < 1 || K < 32 || K % 32 || N < 1) return -1;
    pthread_mutex_lock(&call_mu);
    int rc = scratch((size_t)M * K);
    if (rc == 0) {
        quantize_rows(x, M, K, scr_q, scr_d, scr_dx, scr_s, scr_i);
        set_threads(threads);
        q8_args a = {M, K, N, w, s, scr_q, scr_d, scr_dx, y};
        parallel_for(q8_task, &a, (N + Q8_ROWS - 1) / Q8_ROWS);
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

#if defined(LB_AVX2)
static inline __m256 load8(const void *w, int bf16, size_t i) {
    if (!bf16) return _mm256_loadu_ps((const float *)w + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

static void dense_task(void *vp, int r0, int r1) {
    const dense_args *a = vp;
    const int K = a->K;
    for (int n = r0; n < r1; n++) {
        size_t base = (size_t)n * K;
        int k = 0;
        float acc = 0.f;
#if defined(LB_AVX2)
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (; k + 16 <= K; k += 16) {
            acc0 = _mm256_fmadd_ps(load8(a->w, a->bf16, base + k), _mm256_loadu_ps(a->x + k), acc0);
            acc1 = _mm256_fmadd_ps(load8(a->w, a->bf16, base + k + 8), _mm256_loadu_ps(a->x + k + 8), acc1);
        }
        for (; k + 8 <= K; k += 8) acc0 = _mm256_fmadd_ps(load8(a->w, a->bf16, base + k), _mm256_loadu_ps(a->x + k), acc0);
        acc = hsum256(_mm256_add_ps(acc0, acc1));
#endif
        for (; k < K; k++)
            acc += (a->bf16 ? bf16_to_f32(((const uint16_t *)a->w)[base + k]) : ((const float *)a->w)[base + k]) * a->x[k];
        a->y[n] = acc;
    }
}

/* y (N) = W (N, K) @ x (K), W float32 or bf16 (the decoder's float projections; exposed for the self-check) */
int lb_dense_mv(const float *x, int K, const void *w, int bf16, int N, float *y, int threads) {
    if (K < 1 || N < 1) return -1;
    pthread_mutex_lock(&call_mu);
    set_threads(threads);
    dense_args a = {K, N, bf16, w, x, y};
    parallel_for(dense_task, &a, N);
    pthread_mutex_unlock(&call_mu);
    return 0;
}

/* ------------------------------------------------------------- attention ----------------- */
/* One query per head over the cached keys lo..lo+T-1: softmax(q k^T * scale) v. Heads share KV heads
 * in groups (GQA). kc, vc: (n_kv, max_len, D). att: n_heads * max_len floats of scratch. */
typedef struct {
    const float *q, *kc, *vc;
    float *o, *att;
    int D, group, max_len, lo, T;
    float scale;
} attn_args;

static inline float dot(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.f;
#if defined(LB_AVX2)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    s = hsum256(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy(float p, const float *x, float *y, int n) {
    int i = 0;
#if defined(LB_AVX2)
    const __m256 vp = _mm256_set1_ps(p);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vp, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += p * x[i];
}

static void attn_task(void *vp, int h0, int h1) {
    const attn_args *a = vp;
    const int D = a->D, T = a->T;
    for (int hh = h0; hh < h1; hh++) {
        const float *q = a->q + (size_t)hh * D;
        const float *kc = a->kc + ((size_t)(hh / a->group) * a->max_len + a->lo) * D;
        const float *vc = a->vc + ((size_t)(hh / a->group) * a->max_len + a->lo) * D;
        float *s = a->att + (size_t)hh * a->max_len, mx = -INFINITY;
        for (int t = 0; t < T; t++) {
            s[t] = dot(q, kc + (size_t)t * D, D) * a->scale;
            mx = s[t] > mx ? s[t] : mx;
        }
        float sum = 0.f;
        for (int t = 0; t < T; t++) {
            s[t] = expf(s[t] - mx);
            sum += s[t];
        }
        float *o = a->o + (size_t)hh * D, inv = 1.f / sum;
        for (int i = 0; i < D; i++) o[i] = 0.f;
        for (int t = 0; t < T; t++) axpy(s[t] * inv, vc + (size_t)t * D, o, D);
    }
}

/* exposed for the self-check: o (n_heads, D) for q (n_heads, D) over keys lo..lo+T-1 */
int lb_attention(const float *q, const float *kc, const float *vc, int n_heads, int n_kv, int D, int max_len, int lo,
                 int T, float scale, float *o, float *att, int threads) {
    if (n_heads < 1 || n_kv < 1 || n_heads % n_kv || T < 1 || lo < 0 || lo + T > max_len) return -1;
    pthread_mutex_lock(&call_mu);
    set_threads(threads);
    attn_args a = {q, kc, vc, o, att, D, n_heads / n_kv, max_len, lo, T, scale};
    parallel_for(attn_task, &a, n_heads);
    pthread_mutex_unlock(&call_mu);
    return 0;
}

/* --------------------------------------------------------------- q4 -> float -------------- */
/* Many rows at once (prefill) are compute-bound: there a float GEMM on weights dequantized once per
 * call beats unpacking nibbles for every row. Writes wt (K, N) row-major. Plain C: each build's
 * compiler flags vectorize it. */
typedef struct {
    int K, N, group, p_f32;
    const uint8_t *w;
    const void *p;
    float *wt;
} deq4_args;

static void deq4_task(void *vp, int rb0, int rb1) {
    const deq4_args *a = vp;
    const int K = a->K, N = a->N, G = a->group;
    q4_args pa = {0, K, N, G, a->w, a->p, a->p_f32, 0, NULL, NULL, NULL, NULL, NULL};
    float *sp = malloc((size_t)(K / G) * 64 * sizeof(float));
    if (!sp) { /* out of memory: NaN weights, never plausible garbage */
        for (int k = 0; k < K; k++)
            for (int n = rb0 * 32; n < rb1 * 32; n++) a->wt[(size_t)k * N + n] = NAN;
        return;
    }
    for (int rb = rb0; rb < rb1; rb++) {
        const uint8_t *wb = a->w + (size_t)rb * K * 16;
        q4_params(&pa, rb, sp);
        for (int gi = 0; gi < K / G; gi++) {
            const float *sc = sp + (size_t)gi * 64, *of = sc + 32;
#if defined(LB_AVX2)
            /* 32 bytes = rows 8q .. 8q + 7, 4 bytes each: byte j of every 32-bit lane is input 8 kc + j (low
             * nibble) and 8 kc + 4 + j (high nibble) of that lane's row */
            const __m256i byte = _mm256_set1_epi32(0xFF), low4 = _mm256_set1_epi32(0x0F);
            for (int kc = gi * G / 8; kc < (gi + 1) * G / 8; kc++) {
                const uint8_t *c = wb + (size_t)kc * 128;
                for (int q = 0; q < 4; q++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(c + 32 * q));
                    const __m256 sq = _mm256_loadu_ps(sc + 8 * q), oq = _mm256_loadu_ps(of + 8 * q);
                    for (int j = 0; j < 4; j++) {
                        const __m256i b = _mm256_and_si256(_mm256_srli_epi32(v, 8 * j), byte);
                        float *lo = a->wt + (size_t)(8 * kc + j) * N + (size_t)rb * 32 + 8 * q;
                        float *hi = lo + (size_t)4 * N;
                        _mm256_storeu_ps(lo, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, low4)), sq, oq));
                        _mm256_storeu_ps(hi, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), sq, oq));
                    }
                }
            }
#else
            for (int k = gi * G; k < (gi + 1) * G; k++) {
                const uint8_t *c = wb + (size_t)(k / 8) * 128 + (k % 8 % 4);
                const int shift = k % 8 < 4 ? 0 : 4;
                float *out = a->wt + (size_t)k * N + (size_t)rb * 32;
                for (int r = 0; r < 32; r++) out[r] = fmaf((float)((c[4 * r] >> shift) & 15), sc[r], of[r]);
            }
#endif
        }
    }
    free(sp);
}

int lb_q4_dequant_t(const uint8_t *w, const void *p, int p_f32, int N, int K, int group, float *wt, int threads) {
    if (!q4_shape_ok(K, N, group, 0)) return -1;
    pthread_mutex_lock(&call_mu);
    set_threads(threads);
    deq4_args a = {K, N, group, p_f32, w, p, wt};
    parallel_for(deq4_task, &a, N / 32);
    pthread_mutex_unlock(&call_mu);
    return 0;
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
    int kind, N, K, group, p_f32, center;
    const void *w, *s; /* weight; int4: its params (scales, offsets), int8: per-row fp32 scale */
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
    if (n_layers < 1 || hidden < 32 || hidden % 32 || inter < 32 || inter % 32 || n_kv < 1 || n_heads % n_kv
        || head_dim < 2 || head_dim % 2 || max_len < 1 || vocab < 1)
        return NULL;
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

/* layer -1: the head. Each projection's shape must be the one the step expects of it. */
int lb_decoder_set_linear(lb_decoder *d, int layer, int which, int kind, int N, int K, int group, int p_f32,
                          int center, const void *w, const void *s, const float *bias, const int64_t *perm) {
    if (layer < -1 || layer >= d->n_layers || which < 0 || which >= W_COUNT || !w) return -1;
    if (kind == LIN_INT4 && (!q4_shape_ok(K, N, group, center) || !s)) return -1;
    if (kind == LIN_INT8 && (K % 32 || !s)) return -1;
    if ((kind == LIN_F32 || kind == LIN_BF16) && perm) return -1;
    if (kind < LIN_F32 || kind > LIN_INT8) return -1;
    const int hd = d->n_heads * d->head_dim, kvd = d->n_kv * d->head_dim;
    int wantN, wantK;
    if (layer < 0) {
        wantN = d->vocab, wantK = d->hidden;
    } else {
        static const int out_of[W_COUNT] = {0, 1, 1, 2, 3, 3, 2}; /* 0 q, 1 k/v, 2 hidden, 3 inter */
        static const int in_of[W_COUNT] = {2, 2, 2, 0, 2, 2, 3};
        const int dims[4] = {hd, kvd, d->hidden, d->inter};
        wantN = dims[out_of[which]], wantK = dims[in_of[which]];
    }
    if (N != wantN || K != wantK) return -1;
    lb_linear *l = layer < 0 ? &d->head : &d->layers[layer].w[which];
    *l = (lb_linear){kind, N, K, group, p_f32, center, w, s, bias, perm};
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
    quantize_rows(src, 1, K, scr_q, scr_d, scr_dx, scr_s, scr_i);
    d->prep_x = x;
    d->prep_perm = perm;
}

static void linear(lb_decoder *d, const lb_linear *l, const float *x, float *y) {
    if (l->kind == LIN_F32 || l->kind == LIN_BF16) {
        dense_args a = {l->K, l->N, l->kind == LIN_BF16, l->w, x, y};
        parallel_for(dense_task, &a, l->N);
    } else if (l->kind == LIN_INT4) {
        prep_act(d, x, l->K, l->perm);
        q4_args a = {1, l->K, l->N, l->group, l->w, l->s, l->p_f32, l->center, scr_q, scr_d, scr_s, scr_i, y};
        parallel_for(q4_task, &a, l->N / 32);
    } else {
        prep_act(d, x, l->K, l->perm);
        q8_args a = {1, l->K, l->N, l->w, l->s, scr_q, scr_d, scr_dx, y};
        parallel_for(q8_task, &a, (l->N + Q8_ROWS - 1) / Q8_ROWS);
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

/* one token: h_in (hidden) is its embedding, pos its position; writes logits (vocab) */
int lb_decoder_step(lb_decoder *d, const float *h_in, int pos, float *logits, int threads) {
    if (pos < 0 || pos >= d->max_len) return -1;
    for (int li = 0; li < d->n_layers; li++)
        for (int j = 0; j < W_COUNT; j++)
            if (d->layers[li].w[j].kind == LIN_NONE) return -3; /* a projection was never set */
    if (d->head.kind == LIN_NONE) return -3;
    const int Hd = d->hidden, D = d->head_dim;
    pthread_mutex_lock(&call_mu);
    int wide = Hd > d->inter ? Hd : d->inter, hd = d->n_heads * D;
    if (hd > wide) wide = hd; /* o_proj's input: wider than hidden and MLP in some models */
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
        /* keys lo..pos: all of them, or the last `window` */
        const int lo = L->window > 0 && pos + 1 > L->window ? pos + 1 - L->window : 0;
        attn_args aa = {d->q, L->kc, L->vc, d->o, d->att, D, d->n_heads / d->n_kv, d->max_len, lo, pos + 1 - lo, d->scale};
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
