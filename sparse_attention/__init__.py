"""sparse-attention: Top-θ sparse attention kernels and attention-condensation training for Hugging Face models.

Importing the package registers the ``"top_theta"`` attention implementation with transformers (when
transformers is installed), so ``from_pretrained(..., attn_implementation="top_theta")`` works.
"""

from .functional import top_theta_attention
from .reference import topk_attention
from .validation import AttentionStats

__version__ = "0.1.0"

__all__ = [
    "AttentionStats",
    "top_theta_attention",
    "topk_attention",
]
