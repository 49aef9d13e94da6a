/* The MLP kernel's compiled step; lightning_fimoda/further_training/native.py builds it twice, with
 * REAL = float / double and NAME(x) = x##_f32 / x##_f64.
 *
 * Member by member, one whole forward and backward pass while the member's weights, activations and
 * deltas stay in cache: every product is one call of torch's own BLAS gemm (passed in as `gemm`), and
 * bias, activation, loss, activation derivative and bias gradient are fused loops over its output.
 * A row-major [rows, width] tensor is a column-major [width, rows] matrix to the BLAS.
 *
 * Activation codes: 0 none, 1 ReLU, 2 LeakyReLU (slope >= 0, so its output's sign is its input's),
 * 3 Tanh, 4 Sigmoid. NaN propagates as in torch (ReLU keeps a NaN; its derivative passes the gradient).
 */
#include <stddef.h>
#include <stdint.h>
#include <tgmath.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_LAYERS 64

typedef void (*gemm_fn)(const char *, const char *, const int *, const int *, const int *, const REAL *,
                        const REAL *, const int *, const REAL *, const int *, const REAL *, REAL *, const int *);

/* c[m, n] = op(a) op(b), column-major. */
static void NAME(mm)(gemm_fn gemm, const char *ta, const char *tb, int m, int n, int k, const REAL *a, int lda,
                     const REAL *b, int ldb, REAL *c, int ldc) {
    const REAL one = 1, zero = 0;
    gemm(ta, tb, &m, &n, &k, &one, a, &lda, b, &ldb, &zero, c, &ldc);
}

/* z <- act(z + bias), in place; z: [rows, out]. */
static void NAME(activate)(REAL *z, const REAL *bias, int64_t rows, int64_t out, int64_t act, REAL slope) {
    for (int64_t r = 0; r < rows; r++) {
        REAL *row = z + r * out;
        if (bias)
            for (int64_t o = 0; o < out; o++) row[o] += bias[o];
        switch (act) {
        case 1: for (int64_t o = 0; o < out; o++) row[o] = row[o] < 0 ? 0 : row[o]; break;
        case 2: for (int64_t o = 0; o < out; o++) row[o] = row[o] > 0 ? row[o] : row[o] * slope; break;
        case 3: for (int64_t o = 0; o < out; o++) row[o] = tanh(row[o]); break;
        case 4: for (int64_t o = 0; o < out; o++) row[o] = 1 / (1 + exp(-row[o])); break;
        default: break;
        }
    }
}

/* delta <- delta * act'(t), t the activation's output, and gb <- the column sums of delta (when gb). */
static void NAME(derivative)(REAL *delta, const REAL *t, REAL *gb, int64_t rows, int64_t out, int64_t act,
                             REAL slope) {
    if (gb)
        for (int64_t o = 0; o < out; o++) gb[o] = 0;
    for (int64_t r = 0; r < rows; r++) {
        REAL *d = delta + r * out;
        const REAL *tr = t + r * out;
        switch (act) {
        case 1: for (int64_t o = 0; o < out; o++) d[o] = tr[o] <= 0 ? 0 : d[o]; break;
        case 2: for (int64_t o = 0; o < out; o++) d[o] = tr[o] > 0 ? d[o] : d[o] * slope; break;
        case 3: for (int64_t o = 0; o < out; o++) d[o] *= 1 - tr[o] * tr[o]; break;
        case 4: for (int64_t o = 0; o < out; o++) d[o] *= tr[o] * (1 - tr[o]); break;
        default: break;
        }
        if (gb)
            for (int64_t o = 0; o < out; o++) gb[o] += d[o];
    }
}

/* Per-row loss of the outputs o [rows, O] (0: squared error against y [rows, O]; 1: cross-entropy
 * against int64 labels y [rows]) into ell [rows], and its gradient in o into d [rows, O].
 * Returns -1 on a label outside [0, O). */
static int NAME(loss)(const REAL *o, const void *y, int64_t rows, int64_t O, int64_t kind, REAL *ell, REAL *d) {
    for (int64_t r = 0; r < rows; r++) {
        const REAL *orow = o + r * O;
        REAL *dr = d + r * O, e = 0;
        if (kind == 0) {
            const REAL *yr = (const REAL *)y + r * O;
            for (int64_t j = 0; j < O; j++) {
                REAL diff = orow[j] - yr[j];
                e += diff * diff;
                dr[j] = 2 * diff;
            }
        } else {
            int64_t label = ((const int64_t *)y)[r];
            if (label < 0 || label >= O) return -1;
            REAL m = orow[0], s = 0;
            for (int64_t j = 1; j < O; j++) m = orow[j] > m ? orow[j] : m;
            for (int64_t j = 0; j < O; j++) s += exp(orow[j] - m);
            REAL lse = m + log(s);
            e = lse - orow[label];
            for (int64_t j = 0; j < O; j++) dr[j] = exp(orow[j] - lse);
            dr[label] -= 1;
        }
        ell[r] = e;
    }
    return 0;
}

/* 1 when built with OpenMP (the members then run on the caller's OpenMP threads, torch's pool), else 0. */
int NAME(mlp_step_parallel)(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* K members of an L-layer MLP with widths dims[0..L]; layer l: weights W[l] [K, dims[l+1], dims[l]],
 * biases B[l] [K, dims[l+1]] (or NULL), then activation act[l] (slope slopes[l]).
 * Member k reads x + k*xs [R, dims[0]], y + k*ys (targets, see loss), w + k*ws [R] (row weights).
 * With w: value[k] = sum_r w_r loss_r and the gradients of that sum go to GW[l], GB[l] (like W, B);
 * without w (NULL): forward only, value [K, R] = loss_r.
 * The members are split over `threads` OpenMP threads (the BLAS runs sequentially inside them), each
 * with its own slice of work: threads * R * (dims[1] + ... + dims[L] + 2 max(dims) + 1) elements.
 * Returns 0, -1 (a label out of range) or -2 (more than MAX_LAYERS layers). */
int NAME(mlp_step)(gemm_fn gemm, int64_t K, int64_t threads, int64_t R, int64_t L, const int64_t *dims,
                   const int64_t *act, const double *slopes, REAL *const *W, REAL *const *B, REAL *const *GW,
                   REAL *const *GB, const REAL *x, int64_t xs, const void *y, int64_t ys, int64_t loss,
                   const REAL *w, int64_t ws, REAL *value, REAL *work) {
    if (L > MAX_LAYERS) return -2;
    int64_t width = 0, per_thread = 0;
    for (int64_t l = 0; l <= L; l++) width = dims[l] > width ? dims[l] : width;
    for (int64_t l = 0; l < L; l++) per_thread += R * dims[l + 1];
    per_thread += 2 * R * width + R;
    const size_t ysize = loss == 0 ? sizeof(REAL) : sizeof(int64_t);
    int code = 0;
#pragma omp parallel for schedule(static) num_threads((int)threads) if (threads > 1) reduction(min : code)
    for (int64_t k = 0; k < K; k++) {
#ifdef _OPENMP
        REAL *mine = work + omp_get_thread_num() * per_thread;
#else
        REAL *mine = work;
#endif
        REAL *a[MAX_LAYERS];
        int64_t used = 0;
        for (int64_t l = 0; l < L; l++) {
            a[l] = mine + used;
            used += R * dims[l + 1];
        }
        REAL *d0 = mine + used, *d1 = d0 + R * width, *ell = d1 + R * width;
        const REAL *xk = x + k * xs;
        const REAL *prev = xk;
        for (int64_t l = 0; l < L; l++) {
            int in = (int)dims[l], out = (int)dims[l + 1];
            NAME(mm)(gemm, "T", "N", out, (int)R, in, W[l] + k * (int64_t)out * in, in, prev, in, a[l], out);
            NAME(activate)(a[l], B[l] ? B[l] + k * out : NULL, R, out, act[l], (REAL)slopes[l]);
            prev = a[l];
        }
        if (NAME(loss)(a[L - 1], (const char *)y + k * ys * ysize, R, dims[L], loss, w ? ell : value + k * R, d0)) {
            code = -1;
            continue;
        }
        if (!w) continue;
        REAL total = 0;
        for (int64_t r = 0; r < R; r++) {
            REAL wr = w[k * ws + r];
            total += wr * ell[r];
            for (int64_t j = 0; j < dims[L]; j++) d0[r * dims[L] + j] *= wr;
        }
        value[k] = total;
        REAL *delta = d0, *next = d1;
        for (int64_t l = L - 1; l >= 0; l--) {
            int in = (int)dims[l], out = (int)dims[l + 1];
            NAME(derivative)(delta, a[l], GB[l] ? GB[l] + k * out : NULL, R, out, act[l], (REAL)slopes[l]);
            NAME(mm)(gemm, "N", "T", in, out, (int)R, l > 0 ? a[l - 1] : xk, in, delta, out,
                     GW[l] + k * (int64_t)out * in, in);
            if (l > 0) {
                NAME(mm)(gemm, "N", "N", in, (int)R, out, W[l] + k * (int64_t)out * in, in, delta, out, next, in);
                REAL *t = delta;
                delta = next;
                next = t;
            }
        }
    }
    return code;
}
