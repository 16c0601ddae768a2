"""torch_ufom: unbiased first-order hypergradients for PyTorch bi-level optimization.

Public names are re-exported here; see the README for a quick start.
"""
from . import adaptive, inner, truncation
from .adapt import StackedFunctionalModel, adapt, adapt_batch
from .batches import StepBatches
from .diagnostics import Diagnosis, diagnose
from .estimators import NonFiniteHypergradient
from .functional import hypergrad, hypergrad_batch
from .functional_model import FunctionalModel
from .meta_optimizer import MetaOptimizer, MetaResult

__all__ = ["MetaOptimizer", "MetaResult", "hypergrad", "hypergrad_batch", "adapt", "adapt_batch",
           "diagnose", "Diagnosis", "NonFiniteHypergradient",
           "FunctionalModel", "StackedFunctionalModel", "StepBatches", "adaptive", "inner", "truncation"]
__version__ = "0.1.0"
