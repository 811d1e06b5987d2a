"""sparse-attention: Top-θ sparse attention kernels and attention-condensation training for Hugging Face models.

Importing the package registers the ``"top_theta"`` attention implementation with transformers (when
transformers is installed), so ``from_pretrained(..., attn_implementation="top_theta")`` works.
"""

from .calibration import calibrate
from .functional import top_theta_attention
from .hf import collect_stats, configure, ensure_registered, thresholds_of
from .reference import topk_attention
from .thresholds import Thresholds
from .validation import AttentionStats

ensure_registered()

__version__ = "0.1.0"

__all__ = [
    "AttentionStats",
    "Thresholds",
    "calibrate",
    "collect_stats",
    "configure",
    "thresholds_of",
    "top_theta_attention",
    "topk_attention",
]
