"""Image-generation metrics (FID, sFID, Inception Score, precision/recall) as the ADM evaluator defines them,
and KID as torch-fidelity reports it.

Modules: ``resize`` (TF1 bilinear), ``inception`` (the FID Inception-v3 and its verified weights),
``reader`` (streaming images from ``.npz`` or from a folder of PNG/JPEG files), ``features`` (batched
feature extraction), ``stats`` (streamed moments and statistics files), ``fid`` (Frechet distance),
``kid`` (Kernel Inception Distance), ``inception_score``, ``precision_recall``. They depend on torch,
numpy, Pillow (decoding image files) and the standard library only.
"""
