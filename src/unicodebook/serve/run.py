"""Run the app under uvicorn: load the model, listen, print one JSON line with the URL."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import uvicorn

from ..errors import UnicodebookError
from ..lm.model import load_model
from .app import create_app, model_id_of
from .limits import Limits


class _Server(uvicorn.Server):
    """uvicorn's server, announcing its URL on stdout once it accepts connections."""

    def __init__(self, config: uvicorn.Config, host: str):
        super().__init__(config)
        self.host = host

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.should_exit:  # startup failed; uvicorn has said why
            return
        port = self.servers[0].sockets[0].getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        print(json.dumps({"url": f"http://{host}:{port}"}), flush=True)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: a free one); a clear error when it cannot be."""
    if not 0 <= port <= 65535:
        raise UnicodebookError(f"--port must be within 0..65535, got {port}")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UnicodebookError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def serve(
    model_dir: Path, host: str = "127.0.0.1", port: int = 8000, device="cpu", limits: Limits | None = None
) -> int:
    """Serve the model folder until interrupted (Ctrl-C ends it cleanly, exit status 0)."""
    model = load_model(model_dir, device=device)
    sock = bind(host, port)  # after loading: the printed URL means the model is ready
    app = create_app(model, model_id_of(model_dir), limits)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    server = _Server(config, host)
    server.run(sockets=[sock])
    sys.stdout.flush()
    return 0
