"""Offline tasks with verifiable answers, generated from a seed (no download)."""
