"""Single-process placeholder of the distributed API (replaced by the MPI bootstrap)."""
from __future__ import annotations

import signal
from dataclasses import dataclass

import torch

_CTX = None
_STOP = {"flag": False, "signal": None}


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    is_distributed: bool = False

    def all_reduce_sum(self, t):
        return t

    def all_reduce_max(self, t):
        return t

    def broadcast_object(self, obj, src=0):
        return obj

    def barrier(self):
        pass

    def stop_requested(self) -> bool:
        return _STOP["flag"]


def init_distributed(device: str = "auto") -> DistContext:
    global _CTX
    if _CTX is None:
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
        _CTX = DistContext(device=dev)
    return _CTX


def get_context() -> DistContext:
    return init_distributed()


def allreduce_gradients(parameters, ctx: DistContext) -> None:
    return None


def _handler(signum, frame):
    _STOP["flag"] = True
    _STOP["signal"] = signum


def install_stop_handlers() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _handler)


def shutdown() -> None:
    global _CTX
    _CTX = None
