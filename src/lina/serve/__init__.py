"""lina.serve: generate text with an expert-parallel MoE model (``lina generate``).

- :mod:`~lina.serve.requests`: the prompts file and its checks;
- :mod:`~lina.serve.cached_gpt`: the project's GPT as the engine's dense / gate / head parts, with a
  KV cache per request;
- :mod:`~lina.serve.cached_hf`: a Hugging Face MoE checkpoint likewise, with the model's own
  ``DynamicCache``, rotary embeddings and masks per request;
- :mod:`~lina.serve.generator`: batched prefill, then decode step by step, every MoE layer through
  the expert-parallel :class:`lina.infer.engine.InferenceEngine` and its placement policy;
- :mod:`~lina.serve.reference`: the single-process reference the served outputs must equal.
"""
