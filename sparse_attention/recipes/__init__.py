"""Jobs on a model and text: data (corpus, token windows), the shipped default model and its training, condensation
fine-tuning, evaluation and reports (tables, plots, provenance)."""
