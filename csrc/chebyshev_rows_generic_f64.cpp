// The generic row functions of the CPU descriptor kernels for double (chebyshev_rows.h says why
// they are split into four files).
#include "chebyshev_rows.h"

namespace distmlip {
namespace rows {

DISTMLIP_DEFINE_ROWS(generic, )
DISTMLIP_ROW_TABLE(generic, double, rows_generic_f64)

}  // namespace rows
}  // namespace distmlip
