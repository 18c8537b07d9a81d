"""The protocol every data target follows, as Servalcat's likelihood classes do informally.

A target sees a Batch (xyz (B,N,3), b (B,N), occ (B,N)) and returns per-model values (B,)
float64 and gradients with respect to the parameters asked for.  Lower is better.
"""
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass
class Gradients:
    xyz: object = None   # (B,N,3)
    b: object = None     # (B,N)
    occ: object = None   # (B,N)


@runtime_checkable
class Target(Protocol):
    #: which of "xyz", "b", "occ" the target has gradients for
    parameters: tuple

    def value_and_gradient(self, batch, wrt=("xyz",), weight=None):
        """(T (B,) float64, Gradients) with the fields named in ``wrt`` filled; with
        per-model ``weight`` (B,) (a device array), weight T and its gradients."""

    def value(self, batch):
        """T (B,) float64."""

    def stats(self, batch):
        """Per-model statistics: dict of name -> (B,) NumPy array."""

    def fixed_b(self, batch):
        """Context manager: within, ``batch``'s B, U and occupancies (the very arrays) do
        not change, so what follows from them alone may be found once (a sites
        refinement)."""
