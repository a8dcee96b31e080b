"""NVAE-style VAE backbone of LSGM (docs/algorithm.md §1): model, cells, flows, decoder distributions, regularisation."""

from lsgm.vae.nvae import NVAE, NVAEOutput

__all__ = ["NVAE", "NVAEOutput"]
