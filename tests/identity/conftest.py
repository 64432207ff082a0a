"""Fixtures of the identity tests (:mod:`tests.identity.canary`)."""

from tests.identity.canary import canary_study, received

__all__ = ["canary_study", "received"]
