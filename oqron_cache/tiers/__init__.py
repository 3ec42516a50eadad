"""Tier implementations: L1 (:mod:`.memory`) and L2 (:mod:`.redis`)."""
