"""mergekit-sparse: core parameter isolation (CPI-FT) and gradient-based sparse selection (GaLLoP).

Import submodules directly (`mergekit_sparse.analysis.cores`, `mergekit_sparse.fusion.driver`, ...); this package
imports nothing heavy so that the CLI starts fast.
"""

from .errors import SparseMergeError

__version__ = "0.1.0"
__all__ = ["SparseMergeError", "__version__"]
