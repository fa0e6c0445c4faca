"""distmlip.evaluation: metrics, ``evaluate``, parity plots, ASE calculator."""
