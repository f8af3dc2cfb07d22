/* The fused neuron of kernels/neuron.py for float32 potentials on the CPU, in one pass.
 *
 * Same contract and arithmetic as the Triton kernel: V + offset rounded to float32, MSB-first
 * compare and subtract (exact: each subtraction is a Sterbenz case), the level capped at L,
 * value = level * theta rounded to float32, popcount(level) spikes. Built and loaded by
 * kernels/native.py with -ffp-contract=off, so no multiply-add is fused behind our back.
 *
 * The tensor is walked in work items of `rows_per_item` rows of one sample (the caller picks
 * about 4096 neurons): rows over S (channels of an NCHW sample) or runs of positions of C
 * channels (channels-last or [N, C]). Each thread adds its spike counts into its own slice of `scratch` (zeroed by the
 * caller, who sums the slices): no atomics, no allocation here.
 */
#include <stdint.h>

#define INLINE static inline __attribute__((always_inline))

#ifdef _OPENMP
#include <omp.h>
#define THREAD_INDEX omp_get_thread_num()
#else
#define THREAD_INDEX 0
#endif

INLINE int popcount_byte(int x) {
    x = x - ((x >> 1) & 0x55);
    x = (x & 0x33) + ((x >> 2) & 0x33);
    return (x + (x >> 4)) & 0x0F;
}

/* Fire `rows` rows of `len` adjacent neurons, row r at v + r * row_stride, of one sample.
 * THETA_PER_ELEMENT 0 (rows over S): row r is channel r; theta, offset and channel_spikes start
 * at the first row's channel. THETA_PER_ELEMENT 1 (a flat run over positions and channels):
 * element i reads theta[i] and offset[i] and adds its spikes to channel_spikes[i], arrays the
 * caller lays out per element of the run. Returns the spikes of all rows. T, THETA_PER_ELEMENT and
 * WANT_CODES are literals at every call site, so the firing loop unrolls and the element loop
 * vectorizes in the lanes of float32 (a uint8 store in the loop would widen it to 64 lanes with
 * AVX-512, longer than many rows). */
INLINE int64_t fire_rows(const float *restrict v, const float *restrict theta, const float *restrict offset,
                         float *restrict value, uint8_t *restrict codes, int64_t *restrict channel_spikes,
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
            float x = v_row[i] + offset[channel];
            float threshold = th * (float)(1 << (T - 1));
            int level = 0;
            for (int t = 0; t < T; ++t) {
                const int spike = x >= threshold;
                x = spike ? x - threshold : x;
                level = 2 * level + spike;
                threshold *= 0.5f;
            }
            level = level < levels ? level : levels;
            value_row[i] = (float)level * th;
            if (WANT_CODES)
                codes[r * row_stride + i] = (uint8_t)level;
            const int spikes = popcount_byte(level);
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
                                  uint8_t *codes, int64_t *channel_spikes, int64_t rows, int64_t row_stride,
                                  int64_t len, int theta_per_element, int T, int levels) {
#define FIRE_ROWS(PER_ELEMENT, WANT_CODES, T) \
    fire_rows(v, theta, offset, value, codes, channel_spikes, rows, row_stride, len, PER_ELEMENT, WANT_CODES, T, levels)
#define FIRE_ROWS_CASE(T)                                                     \
    case T:                                                                   \
        if (theta_per_element)                                                \
            return codes ? FIRE_ROWS(1, 1, T) : FIRE_ROWS(1, 0, T);           \
        return codes ? FIRE_ROWS(0, 1, T) : FIRE_ROWS(0, 0, T);
    switch (T) {
        FIRE_ROWS_CASE(1) FIRE_ROWS_CASE(2) FIRE_ROWS_CASE(3) FIRE_ROWS_CASE(4)
        FIRE_ROWS_CASE(5) FIRE_ROWS_CASE(6) FIRE_ROWS_CASE(7) FIRE_ROWS_CASE(8)
    }
    return 0;
#undef FIRE_ROWS_CASE
#undef FIRE_ROWS
}

/* theta and offset: [C] float32 for rows over S; for rows over C, `rows_per_item` copies of
 * them end to end (each work item is then one flat run of neurons with per-element theta).
 * scratch: [threads, N + tile] int64, zeros, where tile is C (rows over S) or rows_per_item * C
 * (rows over C: spikes per element of the run, which the caller folds into channels).
 * codes may be null. Returns 0, or 1 for a T outside 1..8. */
int ann2snn_fire_f32(const float *v, const float *theta, const float *offset, float *value, uint8_t *codes,
                     int64_t *scratch, int64_t N, int64_t C, int64_t S, int64_t stride_n, int64_t stride_c,
                     int64_t stride_s, int rows_over_c, int64_t rows_per_item, int timesteps, int levels,
                     int threads) {
    if (timesteps < 1 || timesteps > 8)
        return 1;
    const int64_t rows = rows_over_c ? S : C, row_stride = rows_over_c ? stride_s : stride_c;
    const int64_t tile = rows_over_c ? rows_per_item * C : C;
    const int64_t items_per_sample = (rows + rows_per_item - 1) / rows_per_item;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < N * items_per_sample; ++item) {
        const int64_t n = item / items_per_sample, first = (item % items_per_sample) * rows_per_item;
        const int64_t count = rows - first < rows_per_item ? rows - first : rows_per_item;
        const int64_t base = n * stride_n + first * row_stride;
        int64_t *sample_spikes = scratch + THREAD_INDEX * (N + tile);
        int64_t spikes;
        if (rows_over_c)   /* rows of C adjacent channels, end to end (row_stride == C) */
            spikes = fire_rows_dispatch(v + base, theta, offset, value + base, codes ? codes + base : 0,
                                        sample_spikes + N, 1, 0, count * C, 1, timesteps, levels);
        else
            spikes = fire_rows_dispatch(v + base, theta + first, offset + first, value + base,
                                        codes ? codes + base : 0, sample_spikes + N + first, count, row_stride, S,
                                        0, timesteps, levels);
        sample_spikes[n] += spikes;
    }
    return 0;
}
