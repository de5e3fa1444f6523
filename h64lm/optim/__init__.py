"""Optimizers and learning-rate schedules (`optimizer.py`: AdamW or Muon + AdamW, schedules;
`muon.py`: Muon's orthogonalised updates). Below the trainer, so the planner sizes optimizer
state without importing it."""
