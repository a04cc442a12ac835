"""Tiny random-weight checkpoints for tests and the no-model demo."""
