// The avx2 row functions of the CPU descriptor kernels for double (chebyshev_rows.h says why
// they are split into four files).
#include "chebyshev_rows.h"

#ifdef DISTMLIP_HAVE_AVX2
namespace distmlip {
namespace rows {

DISTMLIP_DEFINE_ROWS(avx2, __attribute__((target("avx2,fma"))))
DISTMLIP_ROW_TABLE(avx2, double, rows_avx2_f64)

}  // namespace rows
}  // namespace distmlip
#endif
