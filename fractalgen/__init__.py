"""Fractal generative models in PyTorch."""
