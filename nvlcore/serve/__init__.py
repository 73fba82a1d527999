"""``nvl serve``'s machinery: an OpenAI-compatible server over a model's generator, and the client side
``nvl eval --endpoint`` uses to answer a dataset split through any such server (docs/serving.md).

* :mod:`~nvlcore.serve.protocol`: the chat-completions request, checked field by field;
* :mod:`~nvlcore.serve.media`: data URLs, ``file://`` URLs and local paths of images and videos;
* :mod:`~nvlcore.serve.engine`: the queue and worker thread that batch requests in flight;
* :mod:`~nvlcore.serve.app`: the FastAPI routes (``serve`` extra: fastapi, uvicorn);
* :mod:`~nvlcore.serve.client`: conversations -> OpenAI messages, and the endpoint as an answer source of
  :func:`nvlcore.eval.runner.evaluate_split` (``openai``, also in the ``serve`` extra);
* :mod:`~nvlcore.serve.vllm_backend`: the ``vllm serve`` command line for an exported model, with the model's
  recommended settings and an adapter exported for vLLM (``nvl serve --backend vllm``).

Importing this package is cheap: the web stack, torch and openai are imported inside functions.
"""

from __future__ import annotations

from nvlcore.serve.app import create_app
from nvlcore.serve.client import conversation_to_messages, endpoint_predictions
from nvlcore.serve.engine import Answer, BatchEngine, Job
from nvlcore.serve.media import MediaResolver
from nvlcore.serve.protocol import ChatRequest, RequestError, parse_chat_request

__all__ = [
    "Answer",
    "BatchEngine",
    "ChatRequest",
    "Job",
    "MediaResolver",
    "RequestError",
    "conversation_to_messages",
    "create_app",
    "endpoint_predictions",
    "parse_chat_request",
]
