"""Exact-likelihood data attribution for a VE-SDE diffusion model on MNIST.

The engine is plain PyTorch and never imports streamlit. Public entry points live in
`engine.likelihood`, `engine.train`, `engine.sampling` and the CLI (`python -m engine`).
"""

__version__ = "0.1.0"
