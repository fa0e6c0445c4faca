"""Small shared helpers: atomic file writes, rank-aware logging."""
from .io import atomic_path, atomic_write_text, atomic_torch_save  # noqa: F401
from .log import log, warn  # noqa: F401
