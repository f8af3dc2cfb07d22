/* The integer neuron of kernels/int_levels.py on the CPU: int32 accumulators to levels by
 * per-channel thresholds, level = lo + #{k : t[c, k] <= A}, in one pass.
 *
 * Each channel's K ascending thresholds come padded to 2^STEPS - 1 entries with 2^31, which no
 * int32 reaches, so the count is a branch-free binary search of STEPS probes (8 for K = 255)
 * instead of K comparisons. The level is stored as uint8, int16 or int32 (out_bytes 1, 2, 4), and,
 * with `scratch`, popcount(level) is added per sample into the thread's own slice of scratch
 * (zeroed by the caller, who sums the slices). Built and loaded by kernels/native.py.
 *
 * The accumulator is int32, or float32 holding integers of magnitude < 2^24 (oneDNN's convolution
 * output, kernels/int_layers.py), which converts to int32 exactly and so needs no pass of its own.
 *
 * The tensor is dense, NCHW or channels-last, and walked in work items of `rows_per_item` rows of
 * one sample, as kernels/neuron_cpu.c walks it: rows over S (row r is channel r, S adjacent
 * positions) or rows over C (a position's C adjacent channels).
 */
#include "cpu_kernel.h"

/* acc[at] as int32 (FLOAT_ACC, a literal at every call site: float32 holding an integer < 2^24). */
INLINE int32_t load_accumulator(const void *restrict acc, int64_t at, const int FLOAT_ACC) {
    return FLOAT_ACC ? (int32_t)((const float *)acc)[at] : ((const int32_t *)acc)[at];
}

/* #{k : t[k] <= a} over the 2^steps - 1 padded thresholds t: the first probe halves the range,
 * each next one halves what is left. steps is a literal up to 8 at the call sites. */
INLINE int32_t count_reached(const int64_t *restrict t, int64_t a, const int steps) {
    int32_t position = 0;
    for (int step = steps - 1; step >= 0; --step) {
        const int32_t half = (int32_t)1 << step;
        position += t[position + half - 1] <= a ? half : 0;
    }
    return position;
}

/* `rows` rows of `len` adjacent accumulators, row r at acc + r * row_stride. PER_ELEMENT 0: row r
 * is channel r (thresholds start at the first row's channel); 1: element i is channel i. Returns
 * the spikes of all rows when COUNT. steps, PER_ELEMENT, OUT_BYTES and COUNT are literals at
 * every call site, so the search unrolls and the store has its width (FLOAT_ACC: see load_accumulator). */
INLINE int64_t level_rows(const void *restrict acc, const int64_t *restrict thresholds, void *restrict out,
                          int64_t rows, int64_t row_stride, int64_t len, int64_t padded, int32_t lo,
                          const int steps, const int PER_ELEMENT, const int OUT_BYTES, const int COUNT,
                          const int FLOAT_ACC) {
    int64_t spikes = 0;
    for (int64_t r = 0; r < rows; ++r) {
        int32_t row_spikes = 0;
        for (int64_t i = 0; i < len; ++i) {
            const int64_t *restrict t = thresholds + (PER_ELEMENT ? i : r) * padded;
            const int64_t at = r * row_stride + i;
            const int32_t level = lo + count_reached(t, load_accumulator(acc, at, FLOAT_ACC), steps);
            store_level(out, at, level, OUT_BYTES);
            if (COUNT)
                row_spikes += popcount_32((uint32_t)level);
        }
        spikes += row_spikes;
    }
    return spikes;
}

#define BLOCK 256   /* elements counted at once: the counts stay in L1 while K compares pass over them */

/* level_rows for few thresholds: K compares per element, vectorized over the row, instead of a
 * search whose probes are gathers. by_level: the thresholds as int32 [K, C], level-major (level
 * k's thresholds of adjacent channels adjacent), 2^31 clamped to INT32_MAX; unreached[c] counts
 * channel c's 2^31 entries, which the count takes back where A = INT32_MAX. (Counting 16 lanes
 * at a time in a register, k inner, measured slower: each compare waits for the last.) */
INLINE int64_t count_rows(const void *restrict acc, const int32_t *restrict by_level,
                          const int32_t *restrict unreached, void *restrict out, int64_t rows,
                          int64_t row_stride, int64_t len, int64_t C, int64_t K, int32_t lo,
                          const int PER_ELEMENT, const int OUT_BYTES, const int COUNT, const int FLOAT_ACC) {
    int64_t spikes = 0;
    int32_t counts[BLOCK], a[BLOCK];
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t b = 0; b < len; b += BLOCK) {
            const int64_t n = len - b < BLOCK ? len - b : BLOCK, first = r * row_stride + b;
            for (int64_t i = 0; i < n; ++i) {
                a[i] = load_accumulator(acc, first + i, FLOAT_ACC);
                counts[i] = 0;
            }
            for (int64_t k = 0; k < K; ++k) {
                const int32_t *restrict t = by_level + k * C + (PER_ELEMENT ? b : r);
                for (int64_t i = 0; i < n; ++i)
                    counts[i] += (PER_ELEMENT ? t[i] : t[0]) <= a[i];
            }
            int32_t block_spikes = 0;
            for (int64_t i = 0; i < n; ++i) {
                const int32_t back = unreached[PER_ELEMENT ? b + i : r];
                const int32_t level = lo + counts[i] - (a[i] == INT32_MAX ? back : 0);
                store_level(out, first + i, level, OUT_BYTES);
                if (COUNT)
                    block_spikes += popcount_32((uint32_t)level);
            }
            spikes += block_spikes;
        }
    }
    return spikes;
}

/* level_rows with its literals: the OpenMP region passes its variables through a struct, where a
 * constant would no longer be one. Above 8 steps (K > 255) the search runs with a variable count. */
static int64_t level_rows_dispatch(const void *acc, const int64_t *thresholds, void *out, int64_t rows,
                                   int64_t row_stride, int64_t len, int64_t padded, int32_t lo, int steps,
                                   int per_element, int out_bytes, int count, int float_acc) {
#define ROWS(STEPS, PER_ELEMENT, OUT_BYTES, COUNT)                                                              \
    (float_acc ? level_rows(acc, thresholds, out, rows, row_stride, len, padded, lo, STEPS, PER_ELEMENT, OUT_BYTES, \
                            COUNT, 1)                                                                             \
               : level_rows(acc, thresholds, out, rows, row_stride, len, padded, lo, STEPS, PER_ELEMENT, OUT_BYTES, \
                            COUNT, 0))
#define BY_LAYOUT(STEPS, OUT_BYTES, COUNT) \
    (per_element ? ROWS(STEPS, 1, OUT_BYTES, COUNT) : ROWS(STEPS, 0, OUT_BYTES, COUNT))
#define BY_OUTPUT(STEPS)                                                                     \
    (out_bytes == 1 ? (count ? BY_LAYOUT(STEPS, 1, 1) : BY_LAYOUT(STEPS, 1, 0))              \
     : out_bytes == 2 ? (count ? BY_LAYOUT(STEPS, 2, 1) : BY_LAYOUT(STEPS, 2, 0))           \
                      : (count ? BY_LAYOUT(STEPS, 4, 1) : BY_LAYOUT(STEPS, 4, 0)))
    switch (steps) {
        case 0: return BY_OUTPUT(0);
        case 1: return BY_OUTPUT(1);
        case 2: return BY_OUTPUT(2);
        case 3: return BY_OUTPUT(3);
        case 4: return BY_OUTPUT(4);
        case 5: return BY_OUTPUT(5);
        case 6: return BY_OUTPUT(6);
        case 7: return BY_OUTPUT(7);
        case 8: return BY_OUTPUT(8);
        default: return BY_OUTPUT(steps);
    }
#undef BY_OUTPUT
#undef BY_LAYOUT
#undef ROWS
}

/* count_rows with its literals (see level_rows_dispatch). */
static int64_t count_rows_dispatch(const void *acc, const int32_t *by_level, const int32_t *unreached, void *out,
                                   int64_t rows, int64_t row_stride, int64_t len, int64_t C, int64_t K, int32_t lo,
                                   int per_element, int out_bytes, int count, int float_acc) {
#define ROWS(PER_ELEMENT, OUT_BYTES, COUNT)                                                                     \
    (float_acc ? count_rows(acc, by_level, unreached, out, rows, row_stride, len, C, K, lo, PER_ELEMENT, OUT_BYTES, \
                            COUNT, 1)                                                                             \
               : count_rows(acc, by_level, unreached, out, rows, row_stride, len, C, K, lo, PER_ELEMENT, OUT_BYTES, \
                            COUNT, 0))
    return DISPATCH_ROWS(ROWS, per_element, out_bytes, count);
#undef ROWS
}

/* acc: int32, or float32 (float_acc) holding integers < 2^24, dense [N, C, S] with sample stride stride_n, channel-last (rows_over_c) or NCHW.
 * Either thresholds, int64 [C, 2^steps], each row ascending and padded with 2^31 (the search), or
 * by_level, int32 [K, C], with unreached [C] (the count, see count_rows; thresholds is then null);
 * for rows over C, rows_per_item copies of each channel's entries end to end, [K, rows_per_item * C]
 * and [rows_per_item * C], as a work item is then one run of its positions' channels.
 * out: same strides as acc. scratch: [threads, N] int64 zeros, or null for no spike counts.
 * Returns 0, or 1 for steps outside 0..31 or a width other than 1, 2, 4. */
int ann2snn_int_levels(const void *acc, const int64_t *thresholds, const int32_t *by_level,
                       const int32_t *unreached, void *out, int64_t *scratch, int64_t N, int64_t C, int64_t S,
                       int64_t stride_n, int rows_over_c, int64_t rows_per_item, int steps, int64_t K, int32_t lo,
                       int out_bytes, int float_acc, int threads) {
    if (steps < 0 || steps > 31 || (out_bytes != 1 && out_bytes != 2 && out_bytes != 4))
        return 1;
    const int64_t rows = rows_over_c ? S : C, row_stride = rows_over_c ? C : S, len = rows_over_c ? C : S;
    const int64_t padded = (int64_t)1 << steps;
    const int64_t items_per_sample = items_of(rows, rows_per_item);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < N * items_per_sample; ++item) {
        const work_item_t walk = work_item(item, items_per_sample, rows, rows_per_item);
        const int64_t n = walk.n, first = walk.first, count = walk.count;
        const int64_t base = n * stride_n + first * row_stride, channel = rows_over_c ? 0 : first;
        const void *item_acc = (const char *)acc + base * 4;   /* int32 and float32 alike */
        void *item_out = (char *)out + base * out_bytes;
        const int64_t spikes = thresholds
            ? level_rows_dispatch(item_acc, thresholds + channel * padded, item_out, count, row_stride, len,
                                  padded, lo, steps, rows_over_c, out_bytes, scratch != 0, float_acc)
            : rows_over_c   /* one flat run of count * C elements (row_stride == C) */
            ? count_rows_dispatch(item_acc, by_level, unreached, item_out, 1, 0, count * C, rows_per_item * C, K,
                                  lo, 1, out_bytes, scratch != 0, float_acc)
            : count_rows_dispatch(item_acc, by_level + channel, unreached + channel, item_out, count,
                                  row_stride, len, C, K, lo, 0, out_bytes, scratch != 0, float_acc);
        if (scratch)
            scratch[THREAD_INDEX * N + n] += spikes;
    }
    return 0;
}
