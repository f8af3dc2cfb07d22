/* What every C kernel of kernels/ shares: forced inlining (so literal arguments specialize a
 * function) and the OpenMP thread index (0 in a build without OpenMP). kernels/native.py keys
 * its build cache by this header too. */
#include <stdint.h>

#define INLINE static inline __attribute__((always_inline))

/* The walk every C kernel shares: each sample's `rows` rows in work items of `rows_per_item` rows
 * (the last item of a sample may hold fewer), items_of(rows, rows_per_item) of them per sample. */
typedef struct {
    int64_t n, first, count;   /* the sample, its first row, how many rows */
} work_item_t;

INLINE int64_t items_of(int64_t rows, int64_t rows_per_item) {
    return (rows + rows_per_item - 1) / rows_per_item;
}

INLINE work_item_t work_item(int64_t item, int64_t items_per_sample, int64_t rows, int64_t rows_per_item) {
    const int64_t first = (item % items_per_sample) * rows_per_item;
    const int64_t count = rows - first < rows_per_item ? rows - first : rows_per_item;
    return (work_item_t){item / items_per_sample, first, count};
}

/* Set bits of a level >= 0 (SWAR, which vectorizes where __builtin_popcount may not). */
INLINE int32_t popcount_32(uint32_t x) {
    x = x - ((x >> 1) & 0x55555555u);
    x = (x & 0x33333333u) + ((x >> 2) & 0x33333333u);
    x = (x + (x >> 4)) & 0x0F0F0F0Fu;
    return (int32_t)((x * 0x01010101u) >> 24);
}

/* out[at] = level in the output's width (OUT_BYTES, a literal at every call site). */
INLINE void store_level(void *restrict out, int64_t at, int32_t level, const int OUT_BYTES) {
    if (OUT_BYTES == 1)
        ((uint8_t *)out)[at] = (uint8_t)level;
    else if (OUT_BYTES == 2)
        ((int16_t *)out)[at] = (int16_t)level;
    else
        ((int32_t *)out)[at] = level;
}

#ifdef _OPENMP
#include <omp.h>
#define THREAD_INDEX omp_get_thread_num()
#else
#define THREAD_INDEX 0
#endif

/* ROWS(PER_ELEMENT, OUT_BYTES, COUNT), a kernel's row function with its literals, called with the
 * literals that the runtime per_element (0 or 1), out_bytes (1, 2 or 4) and count (0 or 1) name. */
#define ROWS_BY_LAYOUT(ROWS, per_element, OUT_BYTES, COUNT) \
    ((per_element) ? ROWS(1, OUT_BYTES, COUNT) : ROWS(0, OUT_BYTES, COUNT))
#define DISPATCH_ROWS(ROWS, per_element, out_bytes, count)                                                   \
    ((out_bytes) == 1   ? ((count) ? ROWS_BY_LAYOUT(ROWS, per_element, 1, 1) : ROWS_BY_LAYOUT(ROWS, per_element, 1, 0)) \
     : (out_bytes) == 2 ? ((count) ? ROWS_BY_LAYOUT(ROWS, per_element, 2, 1) : ROWS_BY_LAYOUT(ROWS, per_element, 2, 0)) \
                        : ((count) ? ROWS_BY_LAYOUT(ROWS, per_element, 4, 1) : ROWS_BY_LAYOUT(ROWS, per_element, 4, 0)))
