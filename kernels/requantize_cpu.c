/* The requantization of kernels/requantize.py on the CPU: the terms of a neuron site to its levels,
 * computed as the QDQ graph writes it, in one pass:
 *     V = sum_i float32(A_i + add_i[c]) * scale_i[c]   (float32, in order)
 *     level = clamp(round_half_even(V / theta[c]), low, high) - low
 * with the spikes popcount(level) added per sample into the thread's own slice of `scratch`.
 *
 * A term's values are uint8 levels, int32 accumulators or float32 holding integers of magnitude
 * < 2^24 (oneDNN's convolution output) whose add is below 2^24 too, so that float32 adds them
 * exactly; int32 sums are taken in int64, then converted once (nearest even, as cvtdq2ps). The
 * rounding is the float32 magic-number trick, exact after the clamp (|low|, |high| < 2^22) and
 * vectorizable; -ffp-contract=off keeps every product and sum rounded as written.
 *
 * Every term shares the first term's dense layout, NCHW or channels-last, walked in work items
 * of `rows_per_item` rows of one sample as kernels/neuron_cpu.c walks it: rows over S (row r is
 * channel r) or rows over C (element i of a row is channel i). Per-channel arrays are [C], or for
 * rows over C [rows_per_item * C], that many copies end to end: a work item is then one flat run
 * of its positions' channels, long enough to vectorize.
 */
#include "cpu_kernel.h"

enum { VALUES_U8 = 0, VALUES_I32 = 1, VALUES_F32 = 2 };

#define MAX_TERMS 8
#define BLOCK 256   /* elements requantized at once: V stays in L1 while the terms add to it */

typedef struct {
    const void *values[MAX_TERMS];
    const int32_t *add[MAX_TERMS];   /* per channel (see above), or null */
    const float *scale[MAX_TERMS];   /* per channel */
    int dtype[MAX_TERMS];
    int terms;
    const float *theta;              /* per channel */
    float low, high;
} sum_t;

/* v[0..n) (+)= float32(values[at + i] + add) * scale over one run, its channel fixed (PER_ELEMENT
 * 0: channel `c`) or the element's own (1: channel c + i). */
#define TERM_LOOP(LOAD)                                                                \
    for (int64_t i = 0; i < n; ++i) {                                                  \
        const int64_t ch = PER_ELEMENT ? c + i : c;                                    \
        const float scaled = (LOAD) * scale[ch];                                       \
        v[i] = FIRST ? scaled : v[i] + scaled;                                         \
    }

INLINE void add_term(float *restrict v, const sum_t *sum, int term, int64_t at, int64_t n, int64_t c,
                     const int PER_ELEMENT, const int FIRST) {
    const float *restrict scale = sum->scale[term];
    const int32_t *restrict add = sum->add[term];
    switch (sum->dtype[term]) {
        case VALUES_U8: {
            const uint8_t *restrict x = (const uint8_t *)sum->values[term] + at;
            if (add) TERM_LOOP((float)((int32_t)x[i] + add[ch]))
            else TERM_LOOP((float)x[i])
            break;
        }
        case VALUES_I32: {
            const int32_t *restrict x = (const int32_t *)sum->values[term] + at;
            if (add) TERM_LOOP((float)((int64_t)x[i] + add[ch]))
            else TERM_LOOP((float)x[i])
            break;
        }
        default: {
            const float *restrict x = (const float *)sum->values[term] + at;
            if (add) TERM_LOOP(x[i] + (float)add[ch])
            else TERM_LOOP(x[i])
        }
    }
}
#undef TERM_LOOP

/* `rows` rows of `len` adjacent elements, row r at r * row_stride: their levels, and their spikes
 * when COUNT. PER_ELEMENT, OUT_BYTES and COUNT are literals at every call site. */
INLINE int64_t requantize_rows(const sum_t *sum, void *restrict out, int64_t base, int64_t rows,
                               int64_t row_stride, int64_t len, int64_t channel, const int PER_ELEMENT,
                               const int OUT_BYTES, const int COUNT) {
    const float magic = 12582912.0f;   /* 1.5 * 2^23: x + magic - magic rounds |x| < 2^22 half to even */
    const float low = sum->low, high = sum->high;
    const float *restrict theta = sum->theta;
    float v[BLOCK];
    int32_t level[BLOCK];
    int64_t spikes = 0;
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t b = 0; b < len; b += BLOCK) {
            const int64_t n = len - b < BLOCK ? len - b : BLOCK, at = base + r * row_stride + b;
            const int64_t c = PER_ELEMENT ? b : channel + r;
            add_term(v, sum, 0, at, n, c, PER_ELEMENT, 1);
            for (int term = 1; term < sum->terms; ++term)
                add_term(v, sum, term, at, n, c, PER_ELEMENT, 0);
            /* three loops, each of one element type, so that each vectorizes */
            for (int64_t i = 0; i < n; ++i) {
                float q = v[i] / theta[PER_ELEMENT ? c + i : c];
                q = q < low ? low : q;
                q = q > high ? high : q;
                level[i] = (int32_t)((q + magic) - magic) - (int32_t)low;
            }
            for (int64_t i = 0; i < n; ++i)
                store_level(out, at + i, level[i], OUT_BYTES);
            if (COUNT) {
                int32_t block_spikes = 0;
                for (int64_t i = 0; i < n; ++i)
                    block_spikes += popcount_32((uint32_t)level[i]);
                spikes += block_spikes;
            }
        }
    }
    return spikes;
}

static int64_t requantize_rows_dispatch(const sum_t *sum, void *out, int64_t base, int64_t rows, int64_t row_stride,
                                        int64_t len, int64_t channel, int per_element, int out_bytes, int count) {
#define ROWS(PER_ELEMENT, OUT_BYTES, COUNT) \
    requantize_rows(sum, out, base, rows, row_stride, len, channel, PER_ELEMENT, OUT_BYTES, COUNT)
    return DISPATCH_ROWS(ROWS, per_element, out_bytes, count);
#undef ROWS
}

/* values, add, scale, dtypes: `terms` entries each (see sum_t); the values dense [N, C, S] with
 * sample stride stride_n, channel-last (rows_over_c) or NCHW, and out in the same strides.
 * scratch: [threads, N] int64 zeros, or null for no spike counts.
 * Returns 0, or 1 for a term count outside 1..MAX_TERMS, a width other than 1, 2, 4, or bounds
 * at or beyond 2^22. */
int ann2snn_requantize(const void *const *values, const int32_t *const *add, const float *const *scale,
                       const int32_t *dtypes, int terms, const float *theta, int32_t low, int32_t high, void *out,
                       int64_t *scratch, int64_t N, int64_t C, int64_t S, int64_t stride_n, int rows_over_c,
                       int64_t rows_per_item, int out_bytes, int threads) {
    if (terms < 1 || terms > MAX_TERMS || (out_bytes != 1 && out_bytes != 2 && out_bytes != 4) || low > high ||
        low <= -(1 << 22) || high >= (1 << 22))
        return 1;
    sum_t sum = {.terms = terms, .theta = theta, .low = (float)low, .high = (float)high};
    for (int i = 0; i < terms; ++i) {
        sum.values[i] = values[i];
        sum.add[i] = add[i];
        sum.scale[i] = scale[i];
        sum.dtype[i] = dtypes[i];
    }
    const int64_t rows = rows_over_c ? S : C, row_stride = rows_over_c ? C : S, len = rows_over_c ? C : S;
    const int64_t items_per_sample = items_of(rows, rows_per_item);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < N * items_per_sample; ++item) {
        const work_item_t walk = work_item(item, items_per_sample, rows, rows_per_item);
        const int64_t n = walk.n, first = walk.first, count = walk.count;
        const int64_t at = n * stride_n + first * row_stride;
        const int64_t spikes = rows_over_c   /* one flat run of count * C elements (row_stride == C) */
            ? requantize_rows_dispatch(&sum, out, at, 1, 0, count * C, 0, 1, out_bytes, scratch != 0)
            : requantize_rows_dispatch(&sum, out, at, count, row_stride, len, first, 0, out_bytes, scratch != 0);
        if (scratch)
            scratch[THREAD_INDEX * N + n] += spikes;
    }
    return 0;
}
