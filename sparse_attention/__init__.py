"""sparse-attention: Top-θ sparse attention kernels and attention-condensation training for Hugging Face models.

Importing the package registers the ``"top_theta"`` attention implementation with transformers (when
transformers is installed), so ``from_pretrained(..., attn_implementation="top_theta")`` works.
"""

from .calibration import calibrate
from .condensation import Condensation, condensation
from .functional import top_theta_attention
from .hf import collect_stats, configure, ensure_registered, thresholds_of
from .reference import topk_attention
from .regularizer import RegularizerTerms, regularizer_terms, topk_regularizer
from .thresholds import Thresholds
from .training import StepLog, finetune
from .validation import AttentionStats

ensure_registered()

__version__ = "0.1.0"

__all__ = [
    "AttentionStats",
    "Condensation",
    "RegularizerTerms",
    "StepLog",
    "Thresholds",
    "calibrate",
    "collect_stats",
    "condensation",
    "configure",
    "finetune",
    "regularizer_terms",
    "thresholds_of",
    "top_theta_attention",
    "topk_attention",
    "topk_regularizer",
]
