"""The add-on's connection to one server: client, live preview, the avatar's info. No bpy."""
from __future__ import annotations

import time
from pathlib import Path

from pvp_contract.client import Client, CurveKeys

from .preview import DOWN, Preview


class Session:
    def __init__(self, endpoint: str, timeout_s: float = 5.0, cache_mb: int = 256, preview_size: int = 0,
                 curve_server_key: str = "", curve_client_secret: str = ""):
        curve = None
        if curve_server_key or curve_client_secret:
            for label, path in (("server public key", curve_server_key), ("client secret key", curve_client_secret)):
                if not Path(path).is_file():
                    raise FileNotFoundError(f"CURVE {label} file not found: {path!r} (see pvp keys)")
            curve = CurveKeys(Path(curve_server_key), Path(curve_client_secret))
        self.settings = dict(endpoint=endpoint, timeout_s=timeout_s, cache_mb=cache_mb, preview_size=preview_size,
                             curve_server_key=curve_server_key, curve_client_secret=curve_client_secret)
        self.curve = curve
        self.client = Client(endpoint, timeout_s, curve, cache_bytes=cache_mb * 1024 * 1024)
        self.preview = Preview(self.client, "rgb8", preview_size or None)
        self.info: dict | None = None
        self.face_mesh: dict | None = None  # the avatar's face mesh, asked for once the info is in
        self.mesh_request: tuple[Client, int, float] | None = None  # its connection, request id, sent at
        self.hello_id: int | None = self.client.send("hello")
        self.hello_sent = time.monotonic()
        self.handler_ms: list[float] = []  # main-thread time of recent frame-change handlers

    @property
    def status(self) -> str:
        if self.info is None:
            return f"connecting to {self.client.endpoint}…" if self.preview.state != DOWN else self.preview.message
        return self.preview.message

    @property
    def greeted(self) -> bool:
        """The hello answered (or the server down), and the face mesh in (or given up) when the avatar has one."""
        return (self.info is not None or self.preview.state == DOWN) and self.mesh_request is None

    def pump(self, timeout_s: float = 0.0):
        """Read replies (the hello's info first, then the face mesh); returns a frame to show, or None."""
        if self.mesh_request is not None:
            self._read_face_mesh()
        if self.info is None and self.hello_id is not None:
            replies = self.client.poll(timeout_s)
            for header, _ in replies:
                if header.get("id") == self.hello_id and header.get("type") == "info":
                    self.info = header
                    self.preview.message = f"connected to {self.client.endpoint}: {header['avatar']['name']}"
                    if header["avatar"].get("has_face_model"):  # on a connection of its own: no reply routing
                        client = self.job_client()
                        self.mesh_request = (client, client.send("face_mesh"), time.monotonic())
            if self.info is None and time.monotonic() - self.hello_sent > self.client.timeout_s:
                self.preview.mark_down(f"no reply from {self.client.endpoint} within {self.client.timeout_s:g} s — "
                                   f"is pvp serve running?")
                self.hello_id = None
            return None
        if self.info is None and self.preview.state != DOWN:  # back up after a failed hello: greet again
            self.hello_id, self.hello_sent = self.client.send("hello"), time.monotonic()
            return None
        return self.preview.pump(timeout_s)

    def _read_face_mesh(self) -> None:
        """Keep the face mesh when its reply is in; give up after the timeout (Add PVP Rig then uses a proxy)."""
        client, request_id, sent = self.mesh_request
        for header, _ in client.poll():
            if header.get("id") == request_id:
                self.face_mesh = header if header.get("type") == "face_mesh" else None
                self.mesh_request = None
        if self.mesh_request is not None and time.monotonic() - sent > self.client.timeout_s:
            self.mesh_request = None
        if self.mesh_request is None:
            client.close()

    def job_client(self) -> Client:
        """A second connection for long jobs (timeline renders), so they never steal preview replies."""
        s = self.settings
        return Client(s["endpoint"], max(s["timeout_s"], 10.0), self.curve, cache_bytes=0)

    def close(self) -> None:
        if self.mesh_request is not None:
            self.mesh_request[0].close()
        self.client.close()
