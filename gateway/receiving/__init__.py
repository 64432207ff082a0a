"""Receiving: the listening socket, the receiver processes, the bounds a hostile peer meets, association policy,
the C-STORE handler, and study assembly (instances grouped into one job per study, complete after a quiet period).

Sees original instances only to spool them sealed; never decodes pixel data or keeps an identifier in clear.
"""
