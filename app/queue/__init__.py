"""The fair queue in front of the providers (SPEC §12)."""
