/* The LoRA op for one-token rows on a CPU, each slot read at its own rank; and slot writes in one call.
 *
 * Reference (lora/ops.py lora_delta_reference, with L = 1), for every group g of rows sharing slot s = slot[g]
 * at rank r = rank[g], and every adapted projection p (index j into the group's projections, columns cols):
 *
 *     h                = x[rows_g] @ a[s, j, :r].T        # (C, in) @ (in, r)  -> (C, r)
 *     y[rows_g, cols] += h @ b[s, :r, cols]               # (C, r) @ (r, w)    -> (C, w)
 *
 * Why a kernel: a decode step over many distinct adapters spends its extra time reading their slots.
 * torch's bmm reads every slot of a batch at the batch's largest rank (a rank-8 slot next to a rank-64
 * one costs 64 rows), and is slow on products two rows tall. Here each (group, projection) is one work
 * item that streams its slot's r rows of A and B once per tile of four rows; items run on torch's
 * OpenMP runtime, items of different groups write different rows of y and items of one group
 * different columns, so no two items write the same element.
 */
#include <stdint.h>
#include <string.h>

#define TILE 4

/* h[k] = a[k] . x for one row: four rank rows per pass, so x is loaded once per four products. */
static void shrink_one(float *h, const float *x, const float *a, int64_t d_in, int32_t rank) {
    int32_t k = 0;
    for (; k + 4 <= rank; k += 4) {
        const float *a0 = a + (int64_t)k * d_in, *a1 = a0 + d_in, *a2 = a1 + d_in, *a3 = a2 + d_in;
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t i = 0; i < d_in; i++) {
            float xv = x[i];
            s0 += a0[i] * xv;
            s1 += a1[i] * xv;
            s2 += a2[i] * xv;
            s3 += a3[i] * xv;
        }
        h[k] = s0, h[k + 1] = s1, h[k + 2] = s2, h[k + 3] = s3;
    }
    for (; k < rank; k++) {
        const float *ak = a + (int64_t)k * d_in;
        float s0 = 0;
#pragma omp simd reduction(+ : s0)
        for (int64_t i = 0; i < d_in; i++) s0 += ak[i] * x[i];
        h[k] = s0;
    }
}

/* h[t * rank + k] = a[k] . xs[t] for four rows (a shorter tile repeats its first row): each rank
 * row of A is loaded once per tile. */
static void shrink_tile(float *h, const float *const *xs, const float *a, int64_t d_in, int32_t rank) {
    const float *x0 = xs[0], *x1 = xs[1], *x2 = xs[2], *x3 = xs[3];
    for (int32_t k = 0; k < rank; k++) {
        const float *ak = a + (int64_t)k * d_in;
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t i = 0; i < d_in; i++) {
            float av = ak[i];
            s0 += av * x0[i];
            s1 += av * x1[i];
            s2 += av * x2[i];
            s3 += av * x3[i];
        }
        h[k] = s0, h[rank + k] = s1, h[2 * rank + k] = s2, h[3 * rank + k] = s3;
    }
}

/* y[c] += sum_k h[k] * b[k][c]: four rank rows per pass, so y is loaded and stored once per four. */
static void expand_one(float *y, const float *h, const float *b, int64_t b_row_stride, int64_t width, int32_t rank) {
    int32_t k = 0;
    for (; k + 4 <= rank; k += 4) {
        const float *b0 = b + (int64_t)k * b_row_stride, *b1 = b0 + b_row_stride, *b2 = b1 + b_row_stride,
                    *b3 = b2 + b_row_stride;
        float h0 = h[k], h1 = h[k + 1], h2 = h[k + 2], h3 = h[k + 3];
#pragma omp simd
        for (int64_t c = 0; c < width; c++) y[c] += h0 * b0[c] + h1 * b1[c] + h2 * b2[c] + h3 * b3[c];
    }
    for (; k < rank; k++) {
        const float *bk = b + (int64_t)k * b_row_stride;
        float hk = h[k];
#pragma omp simd
        for (int64_t c = 0; c < width; c++) y[c] += hk * bk[c];
    }
}

static void item(float *y, int64_t y_stride, const float *x, int64_t x_stride,
                 const float *a, const float *b, int64_t b_row_stride, int64_t d_in, int64_t width,
                 int32_t rank, const int32_t *rows, int32_t count) {
    float h[TILE * rank];
    for (int32_t t0 = 0; t0 < count; t0 += TILE) {
        int32_t nt = count - t0 < TILE ? count - t0 : TILE;
        if (nt == 1) {
            shrink_one(h, x + (int64_t)rows[t0] * x_stride, a, d_in, rank);
        } else {
            const float *xs[TILE];
            for (int32_t t = 0; t < TILE; t++) xs[t] = x + (int64_t)rows[t0 + (t < nt ? t : 0)] * x_stride;
            shrink_tile(h, xs, a, d_in, rank);
        }
        for (int32_t t = 0; t < nt; t++)
            expand_one(y + (int64_t)rows[t0 + t] * y_stride, h + t * rank, b, b_row_stride, width, rank);
    }
}

/* y (rows, y_stride) and x (rows, x_stride) are row-major; a is (S, n, R, d_in) with strides a_slot and
 * a_proj (rank rows are d_in apart); b is (S, R, b_row_stride). Projection p of n_proj is j = proj[p],
 * writing columns col_start[p] .. col_start[p] + col_width[p] of y and reading the same columns of b.
 * Group g holds rows row_idx[group_start[g] .. group_start[g + 1]] on slot group_slot[g] at group_rank[g]. */
void lora_rows(float *y, int64_t y_stride, const float *x, int64_t x_stride,
               const float *a, int64_t a_slot, int64_t a_proj, const float *b, int64_t b_slot, int64_t b_row_stride,
               int64_t d_in, int32_t n_proj, const int32_t *proj, const int64_t *col_start, const int64_t *col_width,
               int32_t n_groups, const int32_t *group_slot, const int32_t *group_rank, const int32_t *group_start,
               const int32_t *row_idx, int32_t num_threads) {
    int64_t items = (int64_t)n_groups * n_proj;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t it = 0; it < items; it++) {
        int32_t g = (int32_t)(it / n_proj), p = (int32_t)(it % n_proj);
        int64_t s = group_slot[g];
        if (group_rank[g] == 0) continue;
        item(y + col_start[p], y_stride, x, x_stride, a + s * a_slot + (int64_t)proj[p] * a_proj,
             b + s * b_slot + col_start[p], b_row_stride, d_in, col_width[p], group_rank[g],
             row_idx + group_start[g], group_start[g + 1] - group_start[g]);
    }
}

/* Block i copies rows[i] rows of row_bytes[i] bytes from src[i] (rows src_stride[i] bytes apart) to dst[i]
 * (dst_stride[i] bytes apart); a NULL src zero-fills. Why: writing an adapter into a slot is a few hundred
 * small strided copies (each layer's A and B^T pieces). As torch ops on the engine's loop thread, each
 * is Python work under the GIL, and any other thread running Python (the server's, a read worker's) may
 * take the GIL for a whole switch interval (5 ms) between two of them. Here the copying is one call that
 * runs without the GIL. */
void copy_blocks(int32_t n, char *const *dst, const int64_t *dst_stride, const char *const *src,
                 const int64_t *src_stride, const int64_t *rows, const int64_t *row_bytes, int32_t num_threads) {
#pragma omp parallel for schedule(dynamic, 4) num_threads(num_threads)
    for (int32_t i = 0; i < n; i++) {
        for (int64_t r = 0; r < rows[i]; r++) {
            if (src[i] == 0)
                memset(dst[i] + r * dst_stride[i], 0, (size_t)row_bytes[i]);
            else
                memcpy(dst[i] + r * dst_stride[i], src[i] + r * src_stride[i], (size_t)row_bytes[i]);
        }
    }
}
