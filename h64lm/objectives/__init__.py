"""Training objectives: what a stage minimises, computed from model outputs and a batch."""
