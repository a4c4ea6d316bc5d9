"""latentrag: Retrieval-Augmented Generation (Lewis et al., 2020) with passages as a latent variable.

The mathematics lives in `marginals`; the model that puts retriever and generator together in `model`.
"""

from latentrag.errors import LatentRagError

__version__ = "0.1.0"

__all__ = ["LatentRagError", "__version__"]
