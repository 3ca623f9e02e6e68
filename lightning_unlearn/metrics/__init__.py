"""Unlearning metrics (DESIGN section 6)."""
