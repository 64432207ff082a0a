"""The identity side: pseudonymisation, the re-identification vault, re-identification, and the two stages that use
them. The ONLY code that sees patient identity; :mod:`gateway.inference` and :mod:`gateway.rt` never import it
(checked on the import graph by ``tests/test_privacy_boundary.py``).
"""
