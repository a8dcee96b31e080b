"""Score networks of the SGM prior (docs/algorithm.md §5): the NCSN++ backbone and its building blocks."""

from lsgm.nets.ncsnpp import AttnBlock, NCSNpp, ResBlockBigGAN

__all__ = ["AttnBlock", "NCSNpp", "ResBlockBigGAN"]
