"""``nvl serve``'s machinery (docs/serving.md); :mod:`~nvlcore.serve.vllm_backend`: the ``vllm serve`` command
line for an exported model, with the model's recommended settings and an adapter exported for vLLM.

Importing this package is cheap: nothing heavy is imported at module level.
"""
