"""Integrations with model libraries. :mod:`.hf`: Hugging Face transformers (``xattention.apply`` / ``remove``)."""
