"""The contract between backbones and reduction methods, below both.

``models/`` and ``reduce/`` import it; it imports neither. A backbone builds a :class:`TokenState` after its
embedding, hands it to its :class:`Reducer` before every block and asks it for a per-layer
:class:`MixerContext`, which its mixers honour generically through a :class:`MixerPlan`. A mixer runs K scan
paths, each in a :class:`ScanOrder` (the sequence forwards or backwards, or a permutation of the token grid).
"""
from .gaps import order_gaps, scan_gap_pair, scan_gaps
from .context import DirectionGate, LinearDirectionGate, MixerContext
from .orders import REVERSED, SEQUENCE, ScanOrder, grid_order, raster_orders, zigzag_orders
from .plan import MixerPlan
from .protected import (PROTECTED_LAYOUTS, free_slots, gate_feature, insert_at, layout_slots, masked_mean,
                        protected_mask, unprotected_index)
from .reducer import Reducer
from .tokens import TokenState, add_rows_, batch_arange, take_rows, token_mse


__all__ = ["DirectionGate", "LinearDirectionGate", "MixerContext", "MixerPlan", "PROTECTED_LAYOUTS", "REVERSED",
           "Reducer", "SEQUENCE", "ScanOrder", "TokenState", "add_rows_", "batch_arange", "free_slots",
           "gate_feature", "grid_order", "insert_at", "layout_slots", "masked_mean", "order_gaps", "protected_mask",
           "raster_orders", "scan_gap_pair", "scan_gaps", "take_rows", "token_mse", "unprotected_index",
           "zigzag_orders"]
