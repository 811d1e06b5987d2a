"""sparse-attention: Top-θ sparse attention kernels and attention-condensation training for Hugging Face models.

Importing the package registers the ``"top_theta"`` attention implementation with transformers (when
transformers is installed), so ``from_pretrained(..., attn_implementation="top_theta")`` works.

Layers (imports go downward only): ``sparse_attention.kernels`` (Triton) under ``sparse_attention.ops`` (tensors in,
tensors out) under ``sparse_attention.hf`` (the only transformers user) under ``sparse_attention.recipes`` (jobs on a
model and text) and the command line. Everything a user needs is importable from here.
"""

from .hf.backend import configure, ensure_registered, thresholds_of
from .hf.calibration import calibrate
from .hf.condensation import Condensation, condensation
from .hf.stats import StatsCollector, TopKAttention, collect_stats
from .hf.trainer import CondensationTrainer
from .ops.attention import top_theta_attention
from .ops.contract import AttentionStats
from .ops.distributed import shard
from .ops.module import TopThetaAttention
from .ops.reference import topk_attention
from .ops.regularizer import RegularizerTerms, regularizer_terms, topk_regularizer
from .ops.thresholds import Thresholds, TopThetaSettings
from .recipes.data import batches, load_texts, stdlib_texts, token_windows
from .recipes.default_model import (
    CONDENSED_MODEL_DIR,
    DEFAULT_MODEL_DIR,
    load_condensed_model,
    load_default_model,
    load_default_tokenizer,
    load_model,
    load_model_and_tokenizer,
)
from .recipes.sweep import sweep
from .recipes.training import StepLog, distillation_loss, finetune

ensure_registered()

__version__ = "0.1.0"

__all__ = [
    "CONDENSED_MODEL_DIR",
    "DEFAULT_MODEL_DIR",
    "AttentionStats",
    "Condensation",
    "CondensationTrainer",
    "RegularizerTerms",
    "StatsCollector",
    "StepLog",
    "Thresholds",
    "TopKAttention",
    "TopThetaAttention",
    "TopThetaSettings",
    "batches",
    "calibrate",
    "collect_stats",
    "condensation",
    "configure",
    "distillation_loss",
    "finetune",
    "load_condensed_model",
    "load_default_model",
    "load_default_tokenizer",
    "load_model",
    "load_model_and_tokenizer",
    "load_texts",
    "regularizer_terms",
    "shard",
    "stdlib_texts",
    "sweep",
    "thresholds_of",
    "token_windows",
    "top_theta_attention",
    "topk_attention",
    "topk_regularizer",
]
