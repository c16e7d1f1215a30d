"""Language-model backends of the chat: ``demo`` (offline), ``ollama`` and ``openai``.

Use :func:`get_backend` to get the backend configured by the ``SSECHAT_LLM_*``
settings, then iterate ``backend.stream(messages)``::

    async for piece in get_backend().stream(messages):
        if isinstance(piece, Usage):
            ...  # token counts, at the end
        else:
            ...  # a piece of text
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from . import demo, ollama, openai
from .base import Backend, LLMError, Usage

__all__ = ["BACKENDS", "Backend", "LLMError", "Usage", "get_backend"]

BACKENDS = ("demo", "ollama", "openai")

_cache: OrderedDict[tuple, Backend] = OrderedDict()
_cache_lock = threading.Lock()
_CACHE_SIZE = 16


def _setting(name: str, default):
    value = getattr(settings, name, default)
    return default if value is None or value == "" else value


def _number(name: str, default: float) -> float:
    value = _setting(name, default)
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ImproperlyConfigured(f"{name} must be a number, got {value!r}.") from exc


def _config() -> tuple:
    kind = str(_setting("SSECHAT_LLM_BACKEND", "demo")).strip().lower()
    if kind not in BACKENDS:
        raise ImproperlyConfigured(
            f"SSECHAT_LLM_BACKEND must be one of {', '.join(BACKENDS)}; "
            f"got {_setting('SSECHAT_LLM_BACKEND', 'demo')!r}."
        )
    return (
        kind,
        str(_setting("SSECHAT_LLM_URL", "")).strip(),
        str(_setting("SSECHAT_LLM_MODEL", "")).strip(),
        str(_setting("SSECHAT_LLM_API_KEY", "")).strip(),
        _number("SSECHAT_LLM_CONNECT_TIMEOUT", 5.0),
        _number("SSECHAT_LLM_READ_TIMEOUT", 60.0),
        _number("SSECHAT_DEMO_TOKENS_PER_SECOND", 30.0),
    )


def _build(config: tuple) -> Backend:
    kind, url, model, api_key, connect_timeout, read_timeout, demo_rate = config
    if kind == "demo":
        return demo.DemoBackend(model=model or demo.DEFAULT_MODEL, tokens_per_second=demo_rate)
    module = ollama if kind == "ollama" else openai
    cls = ollama.OllamaBackend if kind == "ollama" else openai.OpenAIBackend
    url = url or module.DEFAULT_URL
    if not url.startswith(("http://", "https://")):
        raise ImproperlyConfigured(
            f"SSECHAT_LLM_URL must start with http:// or https://; got {url!r}."
        )
    return cls(
        url=url,
        model=model or module.DEFAULT_MODEL,
        api_key=api_key,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )


def get_backend() -> Backend:
    """The backend configured by the settings (one instance per distinct configuration).

    Instances are cached so that their HTTP connection pools are reused; a change
    of settings (as in tests) gives a new instance.
    """
    config = _config()
    with _cache_lock:
        backend = _cache.get(config)
        if backend is not None:
            _cache.move_to_end(config)
            return backend
        backend = _cache[config] = _build(config)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
        return backend
