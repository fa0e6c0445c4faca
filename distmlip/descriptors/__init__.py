"""distmlip.descriptors: neighbour lists, batch collation, aenet Chebyshev descriptor."""
from .batch import Batch, collate  # noqa: F401
from .chebyshev import ChebyshevDescriptor, build_triplets, descriptor_dim, typespin  # noqa: F401
from .neighbors import neighbor_list, pair_offsets  # noqa: F401
