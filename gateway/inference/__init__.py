"""Inference on pseudonymised volumes: CT series to HU volume, model packages and their cache, orientation,
resampling, sliding-window tiling, the onnxruntime predictor, post-processing and progress.

Imports nothing of identity, keys or storage: it can run where no patient identity and no key exists.
"""
