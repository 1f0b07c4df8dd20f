"""Evaluation: feature net, Frechet distance, exact Gaussian-mixture metrics, straightness, class balance."""
