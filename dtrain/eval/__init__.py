"""Evaluation: feature net, Frechet distance, exact Gaussian-mixture metrics, straightness, class balance."""


def eval_seeds(n: int, seed: int) -> list[int]:
    """The noise seeds of n evaluation samples: seed * 1_000_000 + i, disjoint between seeds."""
    return [seed * 1_000_000 + i for i in range(n)]
