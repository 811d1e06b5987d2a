"""Tensors in, tensors out: the attention contract, the float32 reference, the functional API and its backend picker,
the condensation regularizer, thresholds and the ``config.top_theta`` schema. Never imports transformers."""
