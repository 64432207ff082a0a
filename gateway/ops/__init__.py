"""Operations: retention sweeps and shredding, the audit trail, metrics and ``/healthz``, ``status``, structured
logs, and TLS contexts and certificate checks.
"""
