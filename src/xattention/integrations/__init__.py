"""Integrations with model libraries. :mod:`.hf`: Hugging Face transformers (``xattention.apply`` / ``remove``);
:mod:`.prefill`: chunked prefill through the KV cache (``xattention.prefill``)."""
