"""Integrations with model libraries. :mod:`.hf`: Hugging Face transformers (``xattention.apply`` / ``remove``), with the
per-model state, statistics and q/k capture in :mod:`.state` and mask reading in :mod:`.masks`;
:mod:`.prefill`: chunked prefill through the KV cache (``xattention.prefill``)."""
