"""The Hugging Face layer: the only part of the package that imports transformers.

``backend`` registers ``attn_implementation="top_theta"``, adapts transformers' arguments into one attention call and
configures models; ``stats``, ``calibration`` and ``condensation`` are model contexts that answer or observe its
calls.
"""
