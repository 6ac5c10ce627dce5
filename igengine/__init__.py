"""igengine: reproducible, fast sampling for diffusion transformers trained with Internal Guidance.

Importing the package is cheap and never touches CUDA, TensorRT or compiled kernels.
"""

__version__ = "0.1.0"
