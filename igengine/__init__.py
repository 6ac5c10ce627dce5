"""igengine: reproducible, fast sampling for diffusion transformers trained with Internal Guidance.

Importing the package is cheap and never touches CUDA, TensorRT or compiled kernels (nor torch):
``igengine.load`` imports the sampling stack when it is called.

    import igengine
    pipe = igengine.load()                       # the embedded digits model, its own sampler defaults
    images = pipe.images([3, 1, 4], seed=0)      # uint8 [3, 8, 8, 3], as `igengine sample` writes them
"""

__version__ = "0.1.0"


def load(ckpt=None, **options):
    """Load a checkpoint (default: the embedded digits model) into an ``igengine.api.Pipeline``.

    ``pipe.sample(labels, seed=0, indices=None)`` gives final latents, ``pipe.images(...)`` uint8
    pixels, with the checkpoint's own sampler defaults and the numbers of `igengine sample`.
    Keyword options (``model``, ``precision``, ``device``, ``backend``, ``vae``, ``steps``,
    ``cfg_scale``, ...) are those of ``igengine.api.load``, which documents them.
    """
    from igengine.api import load as _load  # lazy: `import igengine` stays free of torch

    return _load(ckpt, **options)


__all__ = ["__version__", "load"]
