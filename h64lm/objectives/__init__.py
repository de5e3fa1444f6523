"""Training objectives: what a stage computes from a micro-batch (loss and named terms), and the
math of the post-training objectives (log-probs, preference losses, policy losses, rewards)."""

from h64lm.objectives.base import Objective, ObjectiveOutput, StepShare
from h64lm.objectives.lm import LanguageModelling
from h64lm.objectives.router_terms import RouterTerm, router_terms

__all__ = ["Objective", "ObjectiveOutput", "StepShare", "LanguageModelling", "RouterTerm", "router_terms"]
