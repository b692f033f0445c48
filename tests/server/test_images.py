"""The image loader against every source and the hostile inputs of BAD_INPUTS.md."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from ggufserve.generation.images import ImageInputError, ImageLimits, LoadedImage, load_image

LIMITS = ImageLimits(fetch_timeout_s=2.0, max_image_bytes=200_000, max_image_pixels=4_000_000)
LEAKS = ("Traceback", "/tmp", "PIL", "cannot identify", "0x")


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


RED = encode(Image.new("RGB", (8, 6), (255, 0, 0)))


def load(url: str, limits: ImageLimits = LIMITS) -> LoadedImage:
    return asyncio.run(load_image(url, limits, param="messages.0.content.0"))


def refused(url: str, limits: ImageLimits = LIMITS) -> str:
    with pytest.raises(ImageInputError) as info:
        load(url, limits)
    error = info.value
    assert error.status_code == 400 and error.param == "messages.0.content.0"
    for leak in LEAKS:
        assert leak not in error.message, error.message
    return error.message


# ---- the sources --------------------------------------------------------------------------


def test_data_uri_raw_base64_and_local_file_give_identical_pixels(tmp_path: Path) -> None:
    (tmp_path / "red.png").write_bytes(RED)
    local = replace(LIMITS, local_media_root=tmp_path)
    b64 = base64.b64encode(RED).decode()
    images = [
        load(f"data:image/png;base64,{b64}"),
        load(b64),
        load("red.png", local),
        load(str(tmp_path / "red.png"), local),
        load(f"file://{tmp_path / 'red.png'}", local),
    ]
    assert {(i.width, i.height, i.digest) for i in images} == {(8, 6, images[0].digest)}
    assert images[0].rgb[:3] == b"\xff\x00\x00" and len(images[0].rgb) == 8 * 6 * 3


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/a.png", "gopher://x/", "javascript:alert(1)", "file:///etc/passwd"],
)
def test_other_schemes_and_disabled_local_paths(url: str) -> None:
    refused(url)


@pytest.mark.parametrize(
    ("url", "text"),
    [
        ("data:image/png;base64,!!!notbase64!!!", "base64"),
        ("data:image/png;base64,iVBORw0KGgo", "base64"),  # bad padding
        ("data:image/png;base64", "','"),
        ("data:image/png;base64,", "empty"),
        ("data:text/html,<html>hi</html>", "invalid"),
        ("data:image/png;base64," + "A" * 400_000, "exceeds"),
    ],
    ids=["alphabet", "padding", "no-comma", "empty", "html", "enormous"],
)
def test_bad_base64(url: str, text: str) -> None:
    assert text in refused(url)


# ---- decoding -----------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "data",
    [
        b"<html><body>404 Not Found</body></html>",
        b"%PDF-1.4\n1 0 obj\n",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        b"%!PS-Adobe-3.0 EPSF-3.0\n",
        RED[: len(RED) // 2],
        encode(Image.new("RGB", (64, 64)), "JPEG")[:200],
        encode(Image.new("RGB", (4, 4)), "TIFF"),
    ],
    ids=["html", "pdf", "svg", "eps", "truncated-png", "truncated-jpeg", "tiff-not-allowed"],
)
def test_non_images_and_broken_images(data: bytes) -> None:
    assert "invalid" in refused(b64(data))


def test_decompression_bomb_refused_before_decoding() -> None:
    # A few KB of PNG declaring 8,000 × 8,000 pixels (64 MP > the 4 MP test cap).
    bomb = encode(Image.new("L", (8000, 8000)), optimize=True)
    assert len(bomb) < 200_000
    assert "pixels" in refused(b64(bomb))


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), color) for color in [(0, 255, 0), (0, 0, 255)] * 50]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    image = load(b64(gif))
    assert image.rgb[:3] == b"\x00\xff\x00"


def test_exif_rotation_is_applied() -> None:
    image = Image.new("RGB", (20, 10), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    loaded = load(b64(encode(image, "JPEG", exif=exif.tobytes())))
    assert (loaded.width, loaded.height) == (10, 20)


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        (Image.new("CMYK", (3, 3), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
        (Image.new("I;16", (3, 3), 65535), "PNG", (255, 255, 255)),
        (Image.new("LA", (3, 3), (0, 0)), "PNG", (255, 255, 255)),
        (Image.new("RGBA", (3, 3), (10, 20, 30, 255)), "PNG", (10, 20, 30)),
        (Image.new("P", (3, 3), 0), "PNG", (0, 0, 0)),
        (Image.new("RGB", (1, 1), (1, 2, 3)), "BMP", (1, 2, 3)),
        (Image.new("RGB", (2000, 1), (9, 9, 9)), "WEBP", None),
    ],
    ids=["cmyk", "16-bit", "transparent", "rgba", "palette", "1x1-bmp", "extreme-aspect"],
)
def test_odd_modes_work(
    image: Image.Image, fmt: str, expected: tuple[int, int, int] | None
) -> None:
    options = {"lossless": True} if fmt == "WEBP" else {}
    loaded = load(b64(encode(image, fmt, **options)))
    assert len(loaded.rgb) == loaded.width * loaded.height * 3
    if expected is not None:
        pixel = tuple(loaded.rgb[:3])
        assert all(abs(a - b) <= 3 for a, b in zip(pixel, expected, strict=True)), pixel


# ---- local paths --------------------------------------------------------------------------


@pytest.fixture
def media(tmp_path: Path) -> Iterator[tuple[Path, ImageLimits]]:
    root = tmp_path / "media"
    root.mkdir()
    (root / "ok.png").write_bytes(RED)
    evil = tmp_path / "media_evil"
    evil.mkdir()
    (evil / "x.png").write_bytes(RED)
    (tmp_path / "secret.png").write_bytes(RED)
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "dir").mkdir()
    (root / "big.png").write_bytes(b"\0" * 300_000)
    os.mkfifo(root / "fifo")
    yield root, replace(LIMITS, local_media_root=root)


@pytest.mark.parametrize(
    "path",
    [
        "../secret.png",
        "%2e%2e/secret.png",
        "dir/../../secret.png",
        "/etc/passwd",
        "{root}_evil/x.png",
        "link.png",
        "dir",
        "fifo",
        "/proc/self/environ",
        "/dev/zero",
        "big.png",
        "missing.png",
    ],
)
def test_local_paths_outside_root_or_not_regular_are_refused(
    media: tuple[Path, ImageLimits], path: str
) -> None:
    root, limits = media
    refused(path.replace("{root}", str(root)), limits)
    refused("file://" + path.replace("{root}", str(root)), limits)


def test_local_path_inside_root_works(media: tuple[Path, ImageLimits]) -> None:
    assert load("ok.png", media[1]).width == 8


# ---- http(s) ------------------------------------------------------------------------------


class EvilHandler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path
        if path == "/ok.png":
            self._send(200, RED, "image/png")
        elif path == "/html":
            self._send(200, b"<html>not an image</html>", "text/html")
        elif path == "/missing":
            self._send(404, b"<html>404</html>", "text/html")
        elif path == "/slow":
            time.sleep(5)
            self._send(200, RED, "image/png")
        elif path == "/trickle":
            self.send_response(200)
            self.end_headers()
            for _ in range(50):
                self.wfile.write(b"\x89")
                self.wfile.flush()
                time.sleep(0.1)
        elif path == "/endless":
            self.send_response(200)
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                return
        elif path == "/lying-length":
            self.send_response(200)
            self.send_header("Content-Length", "10")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                return
        elif path == "/huge-length":
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
        elif path.startswith("/redirect/"):
            hops = int(path.rsplit("/", 1)[1])
            target = "/ok.png" if hops == 0 else f"/redirect/{hops - 1}"
            self._redirect(target)
        elif path == "/to-metadata":
            self._redirect("http://169.254.169.254/latest/meta-data/")
        elif path == "/to-loopback":
            self._redirect(f"http://127.0.0.1:{self.server.server_address[1]}/ok.png")
        else:
            self._send(404, b"", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def evil_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), EvilHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


LOOPBACK_ALLOWED = replace(LIMITS, allowed_private_networks=("127.0.0.0/8",))


def test_http_fetch_matches_other_sources(evil_server: str) -> None:
    fetched = load(f"{evil_server}/ok.png", LOOPBACK_ALLOWED)
    assert fetched.digest == load(b64(RED)).digest


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("/html", "invalid"),
        ("/missing", "HTTP 404"),
        ("/slow", "longer than 2 s"),
        ("/trickle", "longer than 2 s"),
        ("/endless", "exceeds"),
        ("/lying-length", "invalid"),  # reading stops at the declared 10 bytes
        ("/huge-length", "exceeds"),
        ("/redirect/5", "redirected more than 3"),
        # Loopback is allowed for the test server, link-local metadata is not: the hop
        # after the redirect is checked again and refused without connecting.
        ("/to-metadata", "not a public"),
    ],
)
def test_hostile_servers(evil_server: str, path: str, text: str) -> None:
    started = time.monotonic()
    assert text in refused(f"{evil_server}{path}", LOOPBACK_ALLOWED)
    assert time.monotonic() - started < LIMITS.fetch_timeout_s + 2


def test_redirects_within_cap_are_followed(evil_server: str) -> None:
    assert load(f"{evil_server}/redirect/2", LOOPBACK_ALLOWED).width == 8  # 3 hops


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://localhost/x.png",
        "http://[::1]/x.png",
        "http://[::ffff:127.0.0.1]/x.png",
        "http://2130706433/x.png",
        "http://0x7f000001/x.png",
        "http://0.0.0.0/x.png",
        "http://10.0.0.1/x.png",
        "http://172.16.5.4/x.png",
        "http://192.168.1.1/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.64.0.1/x.png",
        "http://[fe80::1]/x.png",
        "https://127.0.0.1:8443/x.png",
    ],
)
def test_non_global_hosts_refused_without_connecting(url: str) -> None:
    started = time.monotonic()
    assert "not a public" in refused(url)
    assert time.monotonic() - started < 1.0


def test_loopback_refused_unless_explicitly_allowed(evil_server: str) -> None:
    assert "not a public" in refused(f"{evil_server}/to-loopback")
    assert load(f"{evil_server}/to-loopback", LOOPBACK_ALLOWED).width == 8
