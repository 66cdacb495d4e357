"""Providers (SPEC §11): several vendors of the same model behind one endpoint, routed per submit."""
