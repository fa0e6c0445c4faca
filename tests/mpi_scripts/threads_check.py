"""Thread pools of a CPU rank after init_distributed: one count for torch and every BLAS/OpenMP
pool, loaded before or after the start (scipy's OpenBLAS is imported afterwards here)."""
import json
import os

import numpy  # noqa: F401  (its OpenBLAS loaded before the start)
import torch

from distmlip.distributed import init_distributed, shutdown

ctx = init_distributed("cpu", torch_group=False)
import scipy.linalg  # noqa: F401,E402  (loaded after the start)
from threadpoolctl import threadpool_info  # noqa: E402

print("THREADS " + json.dumps({"rank": ctx.rank, "torch": torch.get_num_threads(),
                               "pools": sorted({i["num_threads"] for i in threadpool_info()}),
                               "cpus": len(os.sched_getaffinity(0)), "env": os.environ.get("OMP_NUM_THREADS")}),
      flush=True)
shutdown()
