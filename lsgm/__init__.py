"""LSGM: score-based generative modeling in latent space (Vahdat, Kreis, Kautz, NeurIPS 2021)."""

__version__ = "0.1.0"
