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
 *
 * The common case (d_state 16, whole channel vectors, channels contiguous: every Vim-family model) runs a
 * specialised item: the 16 states unrolled with B and C of the step in registers, and each step in three
 * passes over the blocks (step sizes, state update, gate), so that the long softplus and silu chains of
 * different blocks overlap instead of stalling each block's 16 exponentials. On AVX-512, 2^y scales by
 * vscalefps (no clamps) and reciprocals are rcp14 plus a Newton step (no divisions).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

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

#define EXP2_C5 1.535336188319500e-4f /* Cephes exp2f's polynomial on [-0.5, 0.5], highest degree first */
#define EXP2_C4 1.339887440266574e-3f
#define EXP2_C3 9.618437357674640e-3f
#define EXP2_C2 5.550332471162809e-2f
#define EXP2_C1 2.402264791363012e-1f
#define EXP2_C0 6.931472028550421e-1f

/* 2^f for f in [-0.5, 0.5] */
static inline vf exp2_poly(vf f) {
    vf p = splat(EXP2_C5);
    p = p * f + EXP2_C4;
    p = p * f + EXP2_C3;
    p = p * f + EXP2_C2;
    p = p * f + EXP2_C1;
    p = p * f + EXP2_C0;
    p = p * f + 1.0f;
    return p;
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* 2^y to ~2 ulp: k = round(y) (by the 1.5 * 2^23 trick), 2^(y - k) by the polynomial, times 2^k by vscalefps,
 * which saturates to 0 or inf by itself for any y (k exact or not), so no clamps are needed. */
static inline vf vexp2(vf y) {
    vf k = (y + 12582912.0f) - 12582912.0f;
    return (vf)_mm512_scalef_ps((__m512)exp2_poly(y - k), (__m512)k);
}

/* 1 / x to about 1 ulp without a division: the 14-bit estimate and one Newton step */
static inline vf vrcp(vf x) {
    vf r = (vf)_mm512_rcp14_ps((__m512)x);
    return r * (2.0f - x * r);
}
#else
/* 2^y to ~2 ulp; 0 below -127, inf above 128. The scan's decay exp(delta * A) = 2^(delta * A log2 e) with
 * log2 e folded into A once: no range reduction in two parts, and with y clamped to [-127, 128] the biased
 * exponent k + 127 stays in [0, 255] without integer clamps. */
static inline vf vexp2(vf y) {
    y = sel(y < -127.0f, splat(-127.0f), y);
    y = sel(y > 128.0f, splat(128.0f), y);
    vf k = (y + 12582912.0f) - 12582912.0f; /* round to nearest */
    return exp2_poly(y - k) * (vf)((__builtin_convertvector(k, vi) + 127) << 23);
}

static inline vf vrcp(vf x) { return 1.0f / x; }
#endif

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

/* torch's softplus (beta 1, threshold 20): log1p(exp(x)), with log1p(w) = log(m) + (w - (m - 1)) / m for
 * m = 1 + w (the second term restores what rounding m lost, so small w keep their full relative precision) */
static inline vf vsoftplus(vf x) {
    vf w = vexp(sel(x < 20.0f, x, splat(20.0f)));
    vf m = 1.0f + w;
    vf l = vlog(m) + (w - (m - 1.0f)) * vrcp(m);
    return sel(x > 20.0f, x, l);
}

/* silu(x) = x / (1 + exp(-x)); below -80 the result is ~0 either way */
static inline vf vsilu(vf x) {
    vf e = vexp(-sel(x < -80.0f, splat(-80.0f), x)); /* finite, so that vrcp's Newton step never sees inf */
    return x * vrcp(1.0f + e);
}

/* strides (in elements), 3 per tensor in the order u, delta, z, B, C, y and 2 for gap */
enum { S_U = 0, S_DT = 3, S_Z = 6, S_B = 9, S_C = 12, S_Y = 15, S_G = 18 };

/* One scan call. delta is (bsz, dim, len), or with rank > 0 the low-rank (bsz, rank, len) input of dt_proj,
 * whose weight Wdt is given transposed, (rank, dim) contiguous: delta = Wdt^T dt, formed per step in registers.
 * The output is y = scale * weight[b] * scan (weight: per-sample path gates, NULL for all 1), plus the y already
 * there when accumulate is set (several paths summed into one buffer); a sample whose weight is 0 is not scanned.
 * At2 is A * log2(e) transposed, (nst, dim) contiguous. */
typedef struct {
    int64_t dim, len, nst, rank;
    const float *u, *dt, *At2, *B, *C, *D, *z, *bias, *gap, *Wdt, *weight;
    float *y, scale;
    const int64_t *s;
    int32_t softplus, reverse, accumulate;
} scan_args;

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

/* delta + bias of sample b, step t, channels [d0, d0 + nd) */
static inline vf step_size(const scan_args *a, int64_t b, int64_t t, int64_t d0, int nd) {
    const int64_t *s = a->s;
    const float *row = a->dt + b * s[S_DT] + t * s[S_DT + 2];
    vf x = a->bias ? load_block(a->bias + d0, 1, nd) : splat(0.0f);
    if (!a->rank)
        return x + load_block(row + d0 * s[S_DT + 1], s[S_DT + 1], nd);
    for (int64_t r = 0; r < a->rank; r++)
        x += row[r * s[S_DT + 1]] * load_block(a->Wdt + r * a->dim + d0, 1, nd);
    return x;
}

/* the output of sample b, step t, channels [d0, d0 + nd): scale * yv, plus what is there with accumulate */
static inline void put_output(const scan_args *a, int64_t b, int64_t t, int64_t d0, int nd, vf yv, float scale) {
    const int64_t *s = a->s;
    float *p = a->y + b * s[S_Y] + d0 * s[S_Y + 1] + t * s[S_Y + 2];
    yv *= scale;
    if (a->accumulate)
        yv += load_block(p, s[S_Y + 1], nd);
    store_block(p, s[S_Y + 1], nd, yv);
}

/* One sample, channel blocks [k0, k1): all steps, every block per step, so that each step reads whole rows of
 * the inputs (what the hardware prefetcher follows) and B, C once. h holds (k1 - k0) x nst state vectors, then
 * (k1 - k0) for the previous step sizes. */
static void scan_item(const scan_args *a, int64_t b, int64_t k0, int64_t k1, vf *h, float scale) {
    const int64_t *s = a->s, dim = a->dim, nst = a->nst;
    vf *prev = h + (k1 - k0) * nst;
    for (int64_t i = 0; i < (k1 - k0) * nst; i++)
        h[i] = splat(0.0f);
    for (int64_t step = 0; step < a->len; step++) {
        int64_t t = a->reverse ? a->len - 1 - step : step;
        float g = a->gap && step > 0 ? a->gap[b * s[S_G] + t * s[S_G + 1]] : 0.0f;
        const float *bt = a->B + b * s[S_B] + t * s[S_B + 2], *ct = a->C + b * s[S_C] + t * s[S_C + 2];
        for (int64_t k = k0; k < k1; k++) {
            int64_t d0 = k * BLOCK_D;
            int nd = dim - d0 < BLOCK_D ? (int)(dim - d0) : BLOCK_D;
            vf *hk = h + (k - k0) * nst;
            vf uv = load_block(a->u + b * s[S_U] + d0 * s[S_U + 1] + t * s[S_U + 2], s[S_U + 1], nd);
            vf x = step_size(a, b, t, d0, nd);
            if (a->softplus)
                x = vsoftplus(x);
            vf dec = step > 0 ? x + g * prev[k - k0] : x;
            prev[k - k0] = x;
            vf du = x * uv, yv = splat(0.0f);
            for (int64_t n = 0; n < nst; n++) {
                hk[n] = vexp2(dec * load_block(a->At2 + n * dim + d0, 1, nd)) * hk[n] + du * bt[n * s[S_B + 1]];
                yv += hk[n] * ct[n * s[S_C + 1]];
            }
            if (a->D)
                yv += load_block(a->D + d0, 1, nd) * uv;
            if (a->z)
                yv *= vsilu(load_block(a->z + b * s[S_Z] + d0 * s[S_Z + 1] + t * s[S_Z + 2], s[S_Z + 1], nd));
            put_output(a, b, t, d0, nd, yv, scale);
        }
    }
}

/* scan_item for d_state 16, whole channel blocks and unit channel strides of u, z, y and (when given in full)
 * delta: the layout of every Vim-family mixer. Each step runs three passes over the blocks: (1) the step sizes,
 * softplus and gap decay; (2) the 16 unrolled state updates and <h, C> with B and C of the step in registers;
 * (3) the D skip, the silu(z) gate and the output. Passes 1 and 3 are independent across blocks, so their long
 * chains overlap. h holds (k1 - k0) x 16 state vectors, then prev, dec, du and acc (k1 - k0 each). */
static void scan_item_s16(const scan_args *a, int64_t b, int64_t k0, int64_t k1, vf *h, float scale) {
    const int64_t *s = a->s, dim = a->dim, nk = k1 - k0, sb = s[S_B + 1], sc = s[S_C + 1];
    vf *prev = h + nk * 16, *dec = prev + nk, *du = dec + nk, *acc = du + nk;
    for (int64_t i = 0; i < nk * 16; i++)
        h[i] = splat(0.0f);
    for (int64_t step = 0; step < a->len; step++) {
        int64_t t = a->reverse ? a->len - 1 - step : step;
        float g = a->gap && step > 0 ? a->gap[b * s[S_G] + t * s[S_G + 1]] : 0.0f;
        const float *bt = a->B + b * s[S_B] + t * s[S_B + 2], *ct = a->C + b * s[S_C] + t * s[S_C + 2];
        float bn[16], cn[16];
        for (int n = 0; n < 16; n++) {
            bn[n] = bt[n * sb];
            cn[n] = ct[n * sc];
        }
        const float *urow = a->u + b * s[S_U] + t * s[S_U + 2];
        for (int64_t k = 0; k < nk; k++) {
            int64_t d0 = (k0 + k) * BLOCK_D;
            vf uv, x = step_size(a, b, t, d0, BLOCK_D);
            memcpy(&uv, urow + d0, sizeof uv);
            if (a->softplus)
                x = vsoftplus(x);
            dec[k] = step > 0 ? x + g * prev[k] : x;
            prev[k] = x;
            du[k] = x * uv;
        }
        for (int64_t k = 0; k < nk; k++) {
            vf *hk = h + k * 16, dk = dec[k], uk = du[k], y0 = splat(0.0f), y1 = splat(0.0f);
            const float *ak = a->At2 + (k0 + k) * BLOCK_D;
#pragma GCC unroll 16
            for (int n = 0; n < 16; n += 2) { /* two accumulators: half the dependent chain of <h, C> */
                vf a0, a1;
                memcpy(&a0, ak + n * dim, sizeof a0);
                memcpy(&a1, ak + (n + 1) * dim, sizeof a1);
                hk[n] = vexp2(dk * a0) * hk[n] + uk * bn[n];
                hk[n + 1] = vexp2(dk * a1) * hk[n + 1] + uk * bn[n + 1];
                y0 += hk[n] * cn[n];
                y1 += hk[n + 1] * cn[n + 1];
            }
            acc[k] = y0 + y1;
        }
        const float *zrow = a->z ? a->z + b * s[S_Z] + t * s[S_Z + 2] : 0;
        for (int64_t k = 0; k < nk; k++) {
            int64_t d0 = (k0 + k) * BLOCK_D;
            vf yv = acc[k];
            if (a->D) {
                vf dv, uv;
                memcpy(&dv, a->D + d0, sizeof dv);
                memcpy(&uv, urow + d0, sizeof uv);
                yv += dv * uv;
            }
            if (zrow) {
                vf zv;
                memcpy(&zv, zrow + d0, sizeof zv);
                yv *= vsilu(zv);
            }
            put_output(a, b, t, d0, BLOCK_D, yv, scale);
        }
    }
}

/* Returns 0, or -1 when a state buffer cannot be allocated. Strides s: see S_U ... S_G. */
int32_t mambatrim_scan_fwd(int64_t bsz, int64_t dim, int64_t len, int64_t nst, int64_t rank, const float *u,
                           const float *dt, const float *Wdt, const float *At2, const float *B, const float *C,
                           const float *D, const float *z, const float *bias, const float *gap,
                           const float *weight, float *y, const int64_t *s, int32_t softplus, int32_t reverse,
                           float scale, int32_t accumulate, int32_t nthreads) {
    const scan_args a = {dim, len, nst, rank, u, dt, At2, B, C, D, z, bias, gap, Wdt, weight, y, scale, s,
                         softplus, reverse, accumulate};
    int64_t nblk = (dim + BLOCK_D - 1) / BLOCK_D, group = nblk;
    /* blocks per work item: all of a sample's (rows read whole) unless the state outgrows ~32 KB or there are
     * too few items to balance the threads */
    while (group > 1 && (group * nst * BLOCK_D > 8192 || bsz * ((nblk + group - 1) / group) < 4 * nthreads))
        group = (group + 1) / 2;
    int64_t per = (nblk + group - 1) / group, items = bsz * per;
    int32_t failed = 0, fast = nst == 16 && dim % BLOCK_D == 0 && s[S_U + 1] == 1 && s[S_Y + 1] == 1 &&
                               (rank || s[S_DT + 1] == 1) && (!z || s[S_Z + 1] == 1);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads)
#endif
    for (int64_t it = 0; it < items; it++) {
        int64_t b = it / per, k0 = (it % per) * group, k1 = k0 + group < nblk ? k0 + group : nblk;
        float wb = weight ? weight[b] : 1.0f;
        if (wb == 0.0f) { /* a gated-off path of this sample: no scan; zeros unless adding */
            if (!accumulate)
                for (int64_t t = 0; t < len; t++)
                    for (int64_t k = k0; k < k1; k++) {
                        int64_t d0 = k * BLOCK_D;
                        int nd = dim - d0 < BLOCK_D ? (int)(dim - d0) : BLOCK_D;
                        store_block(y + b * s[S_Y] + d0 * s[S_Y + 1] + t * s[S_Y + 2], s[S_Y + 1], nd, splat(0.0f));
                    }
            continue;
        }
        vf *h = aligned_alloc(sizeof(vf), (size_t)((k1 - k0) * (nst + 4)) * sizeof(vf));
        if (!h) {
            failed = 1;
            continue;
        }
        if (fast)
            scan_item_s16(&a, b, k0, k1, h, scale * wb);
        else
            scan_item(&a, b, k0, k1, h, scale * wb);
        free(h);
    }
    return failed ? -1 : 0;
}

/* One sample's steps [t0, t1) of the conv with whole channel vectors and unit channel strides: a block's k
 * weights stay in registers. */
static void conv_span_unit(int64_t b, int64_t t0, int64_t t1, int64_t dim, int64_t len, int64_t k, const float *x,
                           const float *Wt, const float *bias, float *y, const int64_t *s, int32_t reverse,
                           int32_t silu) {
    for (int64_t d0 = 0; d0 < dim; d0 += BLOCK_D) {
        vf w[8], bv = splat(0.0f);
        for (int64_t i = 0; i < k; i++)
            memcpy(&w[i], Wt + i * dim + d0, sizeof(vf));
        if (bias)
            memcpy(&bv, bias + d0, sizeof bv);
        const float *xb = x + b * s[0] + d0;
        float *yb = y + b * s[3] + d0;
        for (int64_t t = t0; t < t1; t++) {
            vf acc = bv;
            for (int64_t i = 0; i < k; i++) {
                int64_t src = reverse ? t + (k - 1) - i : t - (k - 1) + i;
                if (src >= 0 && src < len) {
                    vf xv;
                    memcpy(&xv, xb + src * s[2], sizeof xv);
                    acc += w[i] * xv;
                }
            }
            if (silu)
                acc = vsilu(acc);
            memcpy(yb + t * s[5], &acc, sizeof acc);
        }
    }
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
        if (k <= 8 && dim % BLOCK_D == 0 && s[1] == 1 && s[4] == 1) {
            conv_span_unit(b, t0, t1, dim, len, k, x, Wt, bias, y, s, reverse, silu);
            continue;
        }
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
                    acc = vsilu(acc);
                store_block(y + b * s[3] + d0 * s[4] + t * s[5], s[4], nd, acc);
            }
    }
}

/* Vim's fused add-norm on contiguous fp32 rows: r = hidden + residual (residual may be NULL), then
 * out = r / sqrt(mean(r^2) + eps) * weight; writes r to res_out and the normed rows to out. */
void mambatrim_add_rms_norm(int64_t rows, int64_t dim, const float *hidden, const float *residual,
                            const float *weight, float eps, float *out, float *res_out, int32_t nthreads) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads)
#endif
    for (int64_t i = 0; i < rows; i++) {
        const float *h = hidden + i * dim, *r = residual ? residual + i * dim : 0;
        float *o = out + i * dim, *ro = res_out + i * dim;
        vf ss = splat(0.0f);
        for (int64_t d0 = 0; d0 < dim; d0 += BLOCK_D) {
            int nd = dim - d0 < BLOCK_D ? (int)(dim - d0) : BLOCK_D;
            vf v = load_block(h + d0, 1, nd);
            if (r)
                v += load_block(r + d0, 1, nd);
            store_block(ro + d0, 1, nd, v);
            ss += v * v;
        }
        float total = 0.0f;
        for (int j = 0; j < BLOCK_D; j++)
            total += ss[j];
        vf inv = splat(1.0f / sqrtf(total / (float)dim + eps));
        for (int64_t d0 = 0; d0 < dim; d0 += BLOCK_D) {
            int nd = dim - d0 < BLOCK_D ? (int)(dim - d0) : BLOCK_D;
            store_block(o + d0, 1, nd, load_block(ro + d0, 1, nd) * inv * load_block(weight + d0, 1, nd));
        }
    }
}
