/* The fused neuron of kernels/neuron.py for float32 potentials on the CPU, in one pass.
 *
 * Same contract as the Triton kernel: V + offset rounded to float32, the level of MSB-first
 * compare and subtract (exact: each subtraction is a Sterbenz case; above T = 8 taken as the
 * floor of a double quotient, see fire_level) capped at L, value = level * theta rounded to
 * float32, popcount(level) spikes, and the spike code: the level as uint8 for T <= 8, as uint16
 * for T <= 16 (ann2snn.levels.spike_code_dtype). Built and loaded by kernels/native.py with
 * -ffp-contract=off, so no multiply-add is fused behind our back.
 *
 * The tensor is walked in work items of `rows_per_item` rows of one sample (the caller picks
 * about 4096 neurons): rows over S (channels of an NCHW sample) or runs of positions of C
 * channels (channels-last or [N, C]). Each thread adds its spike counts into its own slice of `scratch` (zeroed by the
 * caller, who sums the slices): no atomics, no allocation here.
 */
#include "cpu_kernel.h"

INLINE int popcount_byte(int x) {
    x = x - ((x >> 1) & 0x55);
    x = (x & 0x33) + ((x >> 2) & 0x33);
    return (x + (x >> 4)) & 0x0F;
}

INLINE int popcount_16(int x) {
    x = x - ((x >> 1) & 0x5555);
    x = (x & 0x3333) + ((x >> 2) & 0x3333);
    x = (x + (x >> 4)) & 0x0F0F;
    return (x + (x >> 8)) & 0x1F;
}

/* The level of a neuron of potential x and step th, capped at `levels`. Up to T = 8 (a literal
 * at every call site), T unrolled steps of compare and subtract. Above, the floor of x / th in
 * double, clamped: exactly the level those steps give (ann2snn.levels.fire_levels takes the same
 * floor, and says why it is exact), as one instantiation for every T of 9..16: eight unrolled
 * ones would triple the build time of this file. */
INLINE int fire_level(float x, float th, const int T, int levels) {
    if (T > 8) {
        double q = (double)x / (double)th;
        q = q > 0 ? q : 0;   /* NaN too: no spike, as compare and subtract gives */
        return (int)(q < levels ? q : levels);
    }
    float threshold = th * (float)(1 << (T - 1));
    int level = 0;
    for (int t = 0; t < T; ++t) {
        const int spike = x >= threshold;
        x = spike ? x - threshold : x;
        level = 2 * level + spike;
        threshold *= 0.5f;
    }
    return level < levels ? level : levels;
}

/* Fire `rows` rows of `len` adjacent neurons, row r at v + r * row_stride, of one sample.
 * THETA_PER_ELEMENT 0 (rows over S): row r is channel r; theta, offset and channel_spikes start
 * at the first row's channel. THETA_PER_ELEMENT 1 (a flat run over positions and channels):
 * element i reads theta[i] and offset[i] and adds its spikes to channel_spikes[i], arrays the
 * caller lays out per element of the run. Returns the spikes of all rows. T (up to 8; 16 stands
 * for every T of 9..16), THETA_PER_ELEMENT and WANT_CODES are literals at every call site, so the
 * firing loop unrolls, the code's width (uint8 up to T = 8, else uint16) is known, and the element
 * loop vectorizes in the lanes of float32 (a uint8 store in the loop would widen it to 64 lanes
 * with AVX-512, longer than many rows). */
INLINE int64_t fire_rows(const float *restrict v, const float *restrict theta, const float *restrict offset,
                         float *restrict value, void *restrict codes, int64_t *restrict channel_spikes,
                         int64_t rows, int64_t row_stride, int64_t len, const int THETA_PER_ELEMENT,
                         const int WANT_CODES, const int T, int levels) {
    int64_t sample_spikes = 0;
    for (int64_t r = 0; r < rows; ++r) {
        const float *restrict v_row = v + r * row_stride;
        float *restrict value_row = value + r * row_stride;
        int32_t row_spikes = 0;
        for (int64_t i = 0; i < len; ++i) {
            const int64_t channel = THETA_PER_ELEMENT ? i : r;
            const float th = theta[channel];
            const int level = fire_level(v_row[i] + offset[channel], th, T, levels);
            value_row[i] = (float)level * th;
            if (WANT_CODES && T <= 8)
                ((uint8_t *)codes)[r * row_stride + i] = (uint8_t)level;
            else if (WANT_CODES)
                ((uint16_t *)codes)[r * row_stride + i] = (uint16_t)level;
            const int spikes = T <= 8 ? popcount_byte(level) : popcount_16(level);
            if (THETA_PER_ELEMENT)
                channel_spikes[i] += spikes;
            row_spikes += spikes;
        }
        if (!THETA_PER_ELEMENT)
            channel_spikes[r] += row_spikes;
        sample_spikes += row_spikes;
    }
    return sample_spikes;
}

/* fire_rows with T, THETA_PER_ELEMENT and WANT_CODES as literals: the OpenMP region passes its
 * variables through a struct, where a constant would no longer be one. */
static int64_t fire_rows_dispatch(const float *v, const float *theta, const float *offset, float *value,
                                  void *codes, int64_t *channel_spikes, int64_t rows, int64_t row_stride,
                                  int64_t len, int theta_per_element, int T, int levels) {
#define FIRE_ROWS(PER_ELEMENT, WANT_CODES, T) \
    fire_rows(v, theta, offset, value, codes, channel_spikes, rows, row_stride, len, PER_ELEMENT, WANT_CODES, T, levels)
#define FIRE_ROWS_CASE(T)                                                     \
    case T:                                                                   \
        if (theta_per_element)                                                \
            return codes ? FIRE_ROWS(1, 1, T) : FIRE_ROWS(1, 0, T);           \
        return codes ? FIRE_ROWS(0, 1, T) : FIRE_ROWS(0, 0, T);
    switch (T > 8 ? 16 : T) {
        FIRE_ROWS_CASE(1) FIRE_ROWS_CASE(2) FIRE_ROWS_CASE(3) FIRE_ROWS_CASE(4)
        FIRE_ROWS_CASE(5) FIRE_ROWS_CASE(6) FIRE_ROWS_CASE(7) FIRE_ROWS_CASE(8)
        FIRE_ROWS_CASE(16)   /* every T of 9..16: fire_level takes the level directly */
    }
    return 0;
#undef FIRE_ROWS_CASE
#undef FIRE_ROWS
}

/* theta and offset: [C] float32 for rows over S; for rows over C, `rows_per_item` copies of
 * them end to end (each work item is then one flat run of neurons with per-element theta).
 * scratch: [threads, N + tile] int64, zeros, where tile is C (rows over S) or rows_per_item * C
 * (rows over C: spikes per element of the run, which the caller folds into channels).
 * codes (uint8 for T <= 8, else uint16) may be null. Returns 0, or 1 for a T outside 1..16. */
int ann2snn_fire_f32(const float *v, const float *theta, const float *offset, float *value, void *codes,
                     int64_t *scratch, int64_t N, int64_t C, int64_t S, int64_t stride_n, int64_t stride_c,
                     int64_t stride_s, int rows_over_c, int64_t rows_per_item, int timesteps, int levels,
                     int threads) {
    if (timesteps < 1 || timesteps > 16)
        return 1;
    const int64_t code_bytes = timesteps <= 8 ? 1 : 2;
    const int64_t rows = rows_over_c ? S : C, row_stride = rows_over_c ? stride_s : stride_c;
    const int64_t tile = rows_over_c ? rows_per_item * C : C;
    const int64_t items_per_sample = items_of(rows, rows_per_item);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < N * items_per_sample; ++item) {
        const work_item_t walk = work_item(item, items_per_sample, rows, rows_per_item);
        const int64_t n = walk.n, first = walk.first, count = walk.count;
        const int64_t base = n * stride_n + first * row_stride;
        int64_t *sample_spikes = scratch + THREAD_INDEX * (N + tile);
        void *item_codes = codes ? (char *)codes + base * code_bytes : 0;
        int64_t spikes;
        if (rows_over_c)   /* rows of C adjacent channels, end to end (row_stride == C) */
            spikes = fire_rows_dispatch(v + base, theta, offset, value + base, item_codes,
                                        sample_spikes + N, 1, 0, count * C, 1, timesteps, levels);
        else
            spikes = fire_rows_dispatch(v + base, theta + first, offset + first, value + base,
                                        item_codes, sample_spikes + N + first, count, row_stride, S,
                                        0, timesteps, levels);
        sample_spikes[n] += spikes;
    }
    return 0;
}
