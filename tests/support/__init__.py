"""Shared test support: local servers and tiny checkpoints."""
