"""Image-generation metrics (FID, sFID, Inception Score, precision/recall) as the ADM evaluator defines them.

Modules: ``resize`` (TF1 bilinear), ``inception`` (the FID Inception-v3 and its verified weights),
``reader`` (streaming images from ``.npz``), ``features`` (batched feature extraction), ``stats``
(streamed moments and statistics files), ``fid`` (Frechet distance), ``inception_score``,
``precision_recall``. They depend on torch, numpy and the standard library only.
"""
