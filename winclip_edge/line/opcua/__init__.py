"""The station's OPC UA face (``serve --opcua``, docs/line.md "OPC UA"): an OPC 40100-1 machine-vision server. Needs
the ``plc`` extra (asyncua) only to start, not to import, so a command line checks its settings first."""
from __future__ import annotations

from typing import Any

from .config import OpcuaConfig, OpcuaError


def start_opcua(config: OpcuaConfig, control: Any, timeout: float = 60.0) -> Any:
    """Check ``config``, then make and start the face (``server.OpcuaFace``) for ``control`` (a
    ``winclip_edge.control.StationControl``); a clear OpcuaError when the plc extra is missing."""
    config.check()
    try:
        from .server import OpcuaFace
    except ImportError as err:
        raise OpcuaError(f"--opcua needs the plc extra: pip install \"winclip-edge[plc]\" ({err})") from None
    return OpcuaFace(config, control).start(timeout)


__all__ = ["OpcuaConfig", "OpcuaError", "start_opcua"]
