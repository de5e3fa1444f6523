"""Mixture-of-Experts feed-forward: router, dispatch, stacked experts, auxiliary losses, balancing
state and routing diagnostics."""

from .balance import moe_layers, set_global_counts, update_router_bias
from .layer import MoELayer
from .losses import router_z_loss, switch_load_balancing_loss
from .stats import plot_load_heatmap, routing_snapshot

__all__ = ["MoELayer", "router_z_loss", "switch_load_balancing_loss", "moe_layers",
           "set_global_counts", "update_router_bias", "routing_snapshot", "plot_load_heatmap"]
