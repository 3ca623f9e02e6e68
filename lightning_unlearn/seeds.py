"""Seeds derived from the run's seed, so that each use of randomness draws from its own stream.

A run's seed is mixed with what it seeds (an epoch, a deletion request) rather than drawn from
the global RNG, so that one use never depends on how many numbers another drew before it: the
retain partners of an epoch, the order of its batches and a request's adapter initialisation are
the same in a resumed run as in an uninterrupted one, and the same whatever the world size.
"""

from __future__ import annotations

# A prime stride larger than any epoch or request count, so (seed, stream) pairs never collide.
SEED_STRIDE = 1_000_003


def stream_seed(seed: int, stream: int) -> int:
    """The seed of stream ``stream`` (an epoch, a request) of the run seeded ``seed``."""
    return seed * SEED_STRIDE + stream
