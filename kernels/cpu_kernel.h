/* What every C kernel of kernels/ shares: forced inlining (so literal arguments specialize a
 * function) and the OpenMP thread index (0 in a build without OpenMP). kernels/native.py keys
 * its build cache by this header too. */
#include <stdint.h>

#define INLINE static inline __attribute__((always_inline))

#ifdef _OPENMP
#include <omp.h>
#define THREAD_INDEX omp_get_thread_num()
#else
#define THREAD_INDEX 0
#endif
