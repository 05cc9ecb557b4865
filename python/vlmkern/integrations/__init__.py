"""Integrations with other libraries; ``vlmkern.integrations.hf`` patches Hugging Face
transformers models (imported on its own: it needs transformers)."""
