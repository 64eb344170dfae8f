"""The HTTP face of a station (``winclip-edge serve --http``): API, review page, metrics. Needs the ``serve`` extra
(FastAPI, uvicorn, prometheus-client); importing this package does not, so a CLI can check arguments first."""
from __future__ import annotations

from .config import HttpConfig, ServiceError, is_loopback


def start_http(*args, **kwargs):
    """See :func:`winclip_edge.service.server.start_http`; a clear ServiceError when the extra is missing."""
    try:
        from .server import start_http as start
    except ImportError as err:
        raise ServiceError(f"--http needs the serve extra: pip install \"winclip-edge[serve]\" ({err})") from None
    return start(*args, **kwargs)


__all__ = ["HttpConfig", "ServiceError", "is_loopback", "start_http"]
