"""Unlearning metrics: TOFU, memorisation, membership inference, generation quality."""
