/* CPU kernels of the torch backend at inference, compiled on first use by cpu_kernels.py: a fused selective
 * scan (Mamba-1, one direction) and a depthwise causal conv.
 *
 * Scan: one work item = one sample x a group of channel blocks (all of them unless the threads need more
 * items). Its state, (blocks x d_state) vectors, stays in L1 for the whole sequence; each step reads whole rows
 * of delta, u, z (what the prefetcher follows) and B, C once, and computes softplus(delta + bias), the gap
 * decay, exp(delta * A) as 2^(delta * A log2 e), the state update, <h, C>, the D skip and the silu(z) gate in
 * one pass. A channel block is one native vector (GCC/Clang vector extensions: AVX-512, AVX2, SSE or NEON);
 * exp2 and log are polynomials (Cephes coefficients) on those vectors. Inputs may have any strides (Vim's
 * mixer hands in transposed views); all tensors are fp32.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#define BLOCK_D 16 /* channels per work item: one native vector */
#elif defined(__AVX__)
#define BLOCK_D 8
#else
#define BLOCK_D 4
#endif

typedef float vf __attribute__((vector_size(BLOCK_D * 4)));
typedef int32_t vi __attribute__((vector_size(BLOCK_D * 4)));

static inline vf splat(float x) { return (vf){0} + x; }
static inline vf sel(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* 2^y to ~2 ulp (Cephes exp2f's polynomial on [-0.5, 0.5]); 0 below -127, inf above 128. The scan's decay
 * exp(delta * A) = 2^(delta * A log2 e) with log2 e folded into A once: no range reduction in two parts, and
 * with y clamped to [-127, 128] the biased exponent k + 127 stays in [0, 255] without integer clamps. */
static inline vf vexp2(vf y) {
    y = sel(y < -127.0f, splat(-127.0f), y);
    y = sel(y > 128.0f, splat(128.0f), y);
    vf k = (y + 12582912.0f) - 12582912.0f; /* round to nearest */
    vf f = y - k;
    vf p = splat(1.535336188319500e-4f);
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    return p * (vf)((__builtin_convertvector(k, vi) + 127) << 23);
}

/* exp(x) = 2^(x log2 e): 0 below about -88, inf above about 88.7 */
static inline vf vexp(vf x) { return vexp2(x * 1.44269504088896341f); }

/* log(m) for normal m > 0 */
static inline vf vlog(vf m) {
    vi bits = (vi)m;
    vf e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, vf);
    vf x = (vf)((bits & 0x007fffff) | 0x3f000000); /* in [0.5, 1) */
    vi small = x < 0.707106781186547524f;
    e = sel(small, e - 1.0f, e);
    x = sel(small, x + x - 1.0f, x - 1.0f);
    vf z = x * x;
    vf y = splat(7.0376836292e-2f);
    y = y * x - 1.1514610310e-1f;
    y = y * x + 1.1676998740e-1f;
    y = y * x - 1.2420140846e-1f;
    y = y * x + 1.4249322787e-1f;
    y = y * x - 1.6668057665e-1f;
    y = y * x + 2.0000714765e-1f;
    y = y * x - 2.4999993993e-1f;
    y = y * x + 3.3333331174e-1f;
    y = y * x * z;
    y += -2.12194440e-4f * e;
    y += -0.5f * z;
    return x + y + 0.693359375f * e;
}

/* torch's softplus (beta 1, threshold 20): log1p(exp(x)), with log1p(w) = log(1 + w) * w / ((1 + w) - 1) */
static inline vf vsoftplus(vf x) {
    vf w = vexp(sel(x < 20.0f, x, splat(20.0f)));
    vf m = 1.0f + w;
    vf d = m - 1.0f;
    vf l = sel(d == 0.0f, w, vlog(m) * (w / sel(d == 0.0f, splat(1.0f), d)));
    return sel(x > 20.0f, x, l);
}

/* strides (in elements), 3 per tensor in the order u, delta, z, B, C, y and 2 for gap */
enum { S_U = 0, S_DT = 3, S_Z = 6, S_B = 9, S_C = 12, S_Y = 15, S_G = 18 };

/* BLOCK_D channels from p with the given stride; lanes from nd on are 0 */
static inline vf load_block(const float *p, int64_t stride, int nd) {
    vf v;
    if (stride == 1 && nd == BLOCK_D) { /* the token-major layout Vim's mixer hands in: one vector load */
        memcpy(&v, p, sizeof v);
        return v;
    }
    float buf[BLOCK_D] = {0};
    for (int j = 0; j < nd; j++)
        buf[j] = p[j * stride];
    memcpy(&v, buf, sizeof v);
    return v;
}

static inline void store_block(float *p, int64_t stride, int nd, vf v) {
    if (stride == 1 && nd == BLOCK_D) {
        memcpy(p, &v, sizeof v);
        return;
    }
    float buf[BLOCK_D];
    memcpy(buf, &v, sizeof buf);
    for (int j = 0; j < nd; j++)
        p[j * stride] = buf[j];
}

/* One sample, channel blocks [k0, k1): all steps, every block per step, so that each step reads whole rows of
 * the inputs (what the hardware prefetcher follows) and B, C once. h holds (k1 - k0) x nst state vectors. */
static void scan_item(int64_t b, int64_t k0, int64_t k1, int64_t dim, int64_t len, int64_t nst, const float *u,
                      const float *dt, const float *At2, const float *B, const float *C, const float *D,
                      const float *z, const float *bias, const float *gap, float *y, const int64_t *s,
                      int32_t softplus, int32_t reverse, vf *h, vf *prev) {
    for (int64_t i = 0; i < (k1 - k0) * nst; i++)
        h[i] = splat(0.0f);
    for (int64_t step = 0; step < len; step++) {
        int64_t t = reverse ? len - 1 - step : step;
        float g = gap && step > 0 ? gap[b * s[S_G] + t * s[S_G + 1]] : 0.0f;
        const float *bt = B + b * s[S_B] + t * s[S_B + 2], *ct = C + b * s[S_C] + t * s[S_C + 2];
        for (int64_t k = k0; k < k1; k++) {
            int64_t d0 = k * BLOCK_D;
            int nd = dim - d0 < BLOCK_D ? (int)(dim - d0) : BLOCK_D;
            vf *hk = h + (k - k0) * nst;
            vf uv = load_block(u + b * s[S_U] + d0 * s[S_U + 1] + t * s[S_U + 2], s[S_U + 1], nd);
            vf x = load_block(dt + b * s[S_DT] + d0 * s[S_DT + 1] + t * s[S_DT + 2], s[S_DT + 1], nd);
            if (bias)
                x += load_block(bias + d0, 1, nd);
            if (softplus)
                x = vsoftplus(x);
            vf dec = step > 0 ? x + g * prev[k - k0] : x;
            prev[k - k0] = x;
            vf du = x * uv, yv = splat(0.0f);
            for (int64_t n = 0; n < nst; n++) {
                hk[n] = vexp2(dec * load_block(At2 + n * dim + d0, 1, nd)) * hk[n] + du * bt[n * s[S_B + 1]];
                yv += hk[n] * ct[n * s[S_C + 1]];
            }
            if (D)
                yv += load_block(D + d0, 1, nd) * uv;
            if (z) {
                vf zv = load_block(z + b * s[S_Z] + d0 * s[S_Z + 1] + t * s[S_Z + 2], s[S_Z + 1], nd);
                yv *= zv / (1.0f + vexp(-zv));
            }
            store_block(y + b * s[S_Y] + d0 * s[S_Y + 1] + t * s[S_Y + 2], s[S_Y + 1], nd, yv);
        }
    }
}

/* At2 is A * log2(e) transposed, (nst, dim) contiguous. Returns 0, or -1 when a state buffer cannot be allocated. */
int32_t mambatrim_scan_fwd(int64_t bsz, int64_t dim, int64_t len, int64_t nst, const float *u, const float *dt,
                           const float *At2, const float *B, const float *C, const float *D, const float *z,
                           const float *bias, const float *gap, float *y, const int64_t *s, int32_t softplus,
                           int32_t reverse, int32_t nthreads) {
    int64_t nblk = (dim + BLOCK_D - 1) / BLOCK_D, group = nblk;
    /* blocks per work item: all of a sample's (rows read whole) unless the state outgrows ~32 KB or there are
     * too few items to balance the threads */
    while (group > 1 && (group * nst * BLOCK_D > 8192 || bsz * ((nblk + group - 1) / group) < 4 * nthreads))
        group = (group + 1) / 2;
    int64_t per = (nblk + group - 1) / group, items = bsz * per;
    int32_t failed = 0;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads)
#endif
    for (int64_t it = 0; it < items; it++) {
        int64_t k0 = (it % per) * group, k1 = k0 + group < nblk ? k0 + group : nblk;
        vf *h = aligned_alloc(sizeof(vf), (size_t)((k1 - k0) * (nst + 1)) * sizeof(vf));
        if (!h) {
            failed = 1;
            continue;
        }
        scan_item(it / per, k0, k1, dim, len, nst, u, dt, At2, B, C, D, z, bias, gap, y, s, softplus, reverse, h,
                  h + (k1 - k0) * nst);
        free(h);
    }
    return failed ? -1 : 0;
}

/* Depthwise causal conv1d (+ bias, + silu) over channel vectors: y[t] = sum_i w[i] x[t - (k-1) + i], or with
 * reverse y[t] = sum_i w[i] x[t + (k-1) - i] (the flip of the causal conv of the flipped sequence). Wt is the
 * weight transposed, (k, dim) contiguous. One work item = one sample x a span of steps, all channels. */
void mambatrim_conv_fwd(int64_t bsz, int64_t dim, int64_t len, int64_t k, const float *x, const float *Wt,
                        const float *bias, float *y, const int64_t *s, int32_t reverse, int32_t silu,
                        int32_t nthreads) {
    int64_t span = 16, per = (len + span - 1) / span, items = bsz * per;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads)
#endif
    for (int64_t it = 0; it < items; it++) {
        int64_t b = it / per, t0 = (it % per) * span, t1 = t0 + span < len ? t0 + span : len;
        for (int64_t t = t0; t < t1; t++)
            for (int64_t d0 = 0; d0 < dim; d0 += BLOCK_D) {
                int nd = dim - d0 < BLOCK_D ? (int)(dim - d0) : BLOCK_D;
                vf acc = bias ? load_block(bias + d0, 1, nd) : splat(0.0f);
                for (int64_t i = 0; i < k; i++) {
                    int64_t src = reverse ? t + (k - 1) - i : t - (k - 1) + i;
                    if (src >= 0 && src < len)
                        acc += load_block(Wt + i * dim + d0, 1, nd) *
                               load_block(x + b * s[0] + d0 * s[1] + src * s[2], s[1], nd);
                }
                if (silu)
                    acc *= 1.0f / (1.0f + vexp(-acc));
                store_block(y + b * s[3] + d0 * s[4] + t * s[5], s[4], nd, acc);
            }
    }
}
