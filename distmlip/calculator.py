"""ASE calculator of distmlip models (re-export of distmlip.evaluation.calculator)."""
from .evaluation.calculator import DistmlipCalculator  # noqa: F401
