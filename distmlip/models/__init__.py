"""distmlip.models: the potential as a sum of energy terms (``bpnn.BPNN``: per-element networks in
``ann``, ZBL in ``zbl``), the networks and their activation table, the one-node force operator, and
the choice of implementation per device (``backend``).  Nothing is imported here, so that importing
one module does not load the others."""
