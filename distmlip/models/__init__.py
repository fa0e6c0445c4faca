"""distmlip.models: per-element networks (BPNN), normalisation, save/load."""
from .bpnn import BPNN, FORMAT, VERSION  # noqa: F401
