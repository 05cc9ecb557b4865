// CPU executor for a GatherPlan (see common/strided_gather.h).
#pragma once

#include "common/strided_gather.h"

namespace vlmkern {

// out (contiguous, plan.total units) <- in (strided per plan); parallel over outer rows.
void cpu_strided_gather(const GatherPlan& plan, const void* in, void* out);

}  // namespace vlmkern
