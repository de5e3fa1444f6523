"""Mixture-of-Experts feed-forward: router, dispatch, stacked experts, auxiliary losses."""

from .layer import MoELayer
from .losses import router_z_loss, switch_load_balancing_loss

__all__ = ["MoELayer", "router_z_loss", "switch_load_balancing_loss"]
