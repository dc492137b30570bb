"""Model analysis: the FLOPs counter."""
from .flops import CONVENTIONS, FlopsReport, LayerFlops, count_flops

__all__ = ["CONVENTIONS", "FlopsReport", "LayerFlops", "count_flops"]
