"""H64LM: Mixture-of-Experts language model pretraining in raw PyTorch, driven by Hydra configs."""
