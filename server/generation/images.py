"""One image loader for every ``image_url`` source: ``data:`` URI, raw base64, http(s),
and (only with an allowed media root) a local path or ``file://`` URL.

Untrusted input throughout: http(s) hosts must resolve only to globally routable
addresses, checked after DNS resolution and again on every redirect, and the connection
goes to the address that was checked (no second lookup to race). Bytes are capped while
reading, the whole fetch has one time limit, and decoding (Pillow, format allow-list,
pixel cap checked before decoding, EXIF orientation, RGB) runs off the event loop.
Every failure is an :class:`ImageInputError` with a client-safe message: never a
decoder's exception text, a path, or the payload.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import ipaddress
import os
import re
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urljoin, urlsplit

import anyio
import anyio.to_thread
import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from ggufserve.errors import InvalidRequestError

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
BASE64 = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}\s*$")
READ_CHUNK_BYTES = 64 * 1024


class ImageInputError(InvalidRequestError):
    """400: an image that cannot be used; the message is safe to show the client."""


@dataclass(frozen=True)
class ImageLimits:
    """Limits for one request's images.

    Attributes:
        max_images: Images per request.
        max_image_bytes: Encoded bytes per image (20 MB).
        max_image_pixels: Width × height before decoding (50 MP).
        fetch_timeout_s: Whole fetch of one URL, redirects included, in seconds.
        max_redirects: Redirect hops followed.
        local_media_root: Folder local paths may point into; None disables local paths.
        allowed_private_networks: Non-global networks that may be fetched from anyway,
            e.g. ``("127.0.0.0/8",)`` for loopback test servers; empty in production.
    """

    max_images: int = 8
    max_image_bytes: int = 20_000_000
    max_image_pixels: int = 50_000_000
    fetch_timeout_s: float = 10.0
    max_redirects: int = 3
    local_media_root: Path | None = None
    allowed_private_networks: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image: ``rgb`` holds ``height × width × 3`` bytes, row-major.
    ``digest`` is the SHA-256 of the pixels and size (a cache key)."""

    rgb: bytes
    width: int
    height: int
    digest: str


async def load_image(url: str, limits: ImageLimits, *, param: str) -> LoadedImage:
    """Fetch or decode one ``image_url.url`` into RGB pixels.

    Raises:
        ImageInputError: unsupported scheme, disallowed host or path, a fetch that fails,
            times out or exceeds the byte cap, or bytes that are not an allowed image.
    """
    raw = await read_source(url, limits, param=param)
    return await anyio.to_thread.run_sync(decode_image, raw, limits, param)


async def read_source(url: str, limits: ImageLimits, *, param: str) -> bytes:
    """The encoded image bytes from any supported source (see the module docstring)."""
    url = url.strip()
    scheme_match = SCHEME.match(url)
    scheme = scheme_match.group(1).lower() if scheme_match else ""
    if scheme == "data":
        return _from_data_uri(url, limits, param)
    if scheme in ("http", "https"):
        return await _from_http(url, limits, param)
    if scheme == "file":
        return await anyio.to_thread.run_sync(
            _from_local, unquote(urlsplit(url).path), limits, param
        )
    if scheme and len(scheme) > 1:  # a drive letter ("C:") is not a scheme
        raise ImageInputError(f"Image URL scheme '{scheme[:16]}' is not supported.", param=param)
    if len(url) >= 16 and BASE64.match(url):
        return _decode_base64(url, limits, param)
    return await anyio.to_thread.run_sync(_from_local, url, limits, param)


def _check_size(size: int, limits: ImageLimits, param: str) -> None:
    if size > limits.max_image_bytes:
        raise ImageInputError(
            f"The image exceeds {limits.max_image_bytes} bytes.",
            param=param,
            code="image_too_large",
        )


def _decode_base64(payload: str, limits: ImageLimits, param: str) -> bytes:
    compact = "".join(payload.split())
    _check_size(len(compact) * 3 // 4, limits, param)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("The image is not valid base64.", param=param) from None
    if not data:
        raise ImageInputError("The image data is empty.", param=param)
    return data


def _from_data_uri(url: str, limits: ImageLimits, param: str) -> bytes:
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise ImageInputError("The data URI has no ',' before its payload.", param=param)
    if header.lower().endswith(";base64"):
        return _decode_base64(payload, limits, param)
    _check_size(len(payload), limits, param)
    data = unquote_to_bytes(payload)
    if not data:
        raise ImageInputError("The image data is empty.", param=param)
    return data


def _from_local(path_text: str, limits: ImageLimits, param: str) -> bytes:
    root = limits.local_media_root
    if root is None:
        raise ImageInputError("Local image paths are disabled on this server.", param=param)
    denied = ImageInputError("The image path is outside the allowed media folder.", param=param)
    root_real = os.path.realpath(root)
    candidate = os.path.realpath(os.path.join(root_real, os.path.expanduser(path_text)))
    if os.path.commonpath([root_real, candidate]) != root_real:
        raise denied
    try:
        # Non-blocking, so a FIFO cannot hang the open; the type check is fstat on the
        # handle that is read (nothing can be swapped in between).
        fd = os.open(candidate, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise denied
            _check_size(info.st_size, limits, param)
            data = handle.read(limits.max_image_bytes + 1)
    except OSError:
        raise ImageInputError("The image file cannot be read.", param=param) from None
    _check_size(len(data), limits, param)
    return data


def _allowed_address(address: str, limits: ImageLimits) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return ip.is_global or any(
        ip in ipaddress.ip_network(network) for network in limits.allowed_private_networks
    )


async def _checked_address(host: str, port: int, limits: ImageLimits, param: str) -> str:
    """Resolve ``host``; every address it resolves to must be allowed. Returns one."""
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise ImageInputError("The image host cannot be resolved.", param=param) from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses or not all(_allowed_address(a, limits) for a in addresses):
        raise ImageInputError(
            "The image host is not a public internet address.", param=param, code="host_not_allowed"
        )
    return addresses[0]


async def _from_http(url: str, limits: ImageLimits, param: str) -> bytes:
    try:
        with anyio.fail_after(limits.fetch_timeout_s):
            async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
                for _ in range(limits.max_redirects + 1):
                    location = await _fetch_once(client, url, limits, param)
                    if isinstance(location, bytes):
                        return location
                    url = location
    except TimeoutError:
        raise ImageInputError(
            f"Fetching the image took longer than {limits.fetch_timeout_s:g} s.", param=param
        ) from None
    except httpx.HTTPError:
        raise ImageInputError("The image could not be fetched.", param=param) from None
    raise ImageInputError(
        f"The image URL redirected more than {limits.max_redirects} times.", param=param
    )


async def _fetch_once(
    client: httpx.AsyncClient, url: str, limits: ImageLimits, param: str
) -> bytes | str:
    """One hop: bytes of a 200 answer, or the next URL of a redirect."""
    parts = httpx.URL(url)
    if parts.scheme not in ("http", "https") or not parts.host:
        raise ImageInputError("Image URLs must be http(s) with a host.", param=param)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = await _checked_address(parts.host, port, limits, param)
    pinned = parts.copy_with(host=address)
    headers = {"Host": parts.netloc.decode("ascii"), "Accept": "image/*"}
    extensions = {"sni_hostname": parts.host} if parts.scheme == "https" else {}
    request = client.build_request("GET", pinned, headers=headers, extensions=extensions)
    response = await client.send(request, stream=True)
    try:
        if response.status_code in REDIRECTS and "location" in response.headers:
            return urljoin(url, response.headers["location"])
        if response.status_code != 200:
            raise ImageInputError(
                f"The image URL answered HTTP {response.status_code}.", param=param
            )
        declared = response.headers.get("content-length", "")
        if declared.isdigit():
            _check_size(int(declared), limits, param)
        body = bytearray()
        async for chunk in response.aiter_bytes(READ_CHUNK_BYTES):
            body += chunk
            _check_size(len(body), limits, param)
        return bytes(body)
    finally:
        await response.aclose()


def decode_image(raw: bytes, limits: ImageLimits, param: str) -> LoadedImage:
    """Decode, checking format and pixel count before decoding; apply EXIF orientation;
    flatten transparency onto white; convert to 8-bit RGB.

    Raises:
        ImageInputError: not an allowed format, too many pixels, or corrupt data.
    """
    invalid = ImageInputError("The image is invalid or of an unsupported format.", param=param)
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.format not in ALLOWED_FORMATS:
                raise invalid
            width, height = image.size
            if width < 1 or height < 1 or width * height > limits.max_image_pixels:
                raise ImageInputError(
                    f"The image has more than {limits.max_image_pixels} pixels.",
                    param=param,
                    code="image_too_large",
                )
            image.seek(0)  # animated GIF/WebP: the first frame
            rgb = _to_rgb(ImageOps.exif_transpose(image) or image)
    except ImageInputError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        Image.DecompressionBombError,
    ):
        raise invalid from None
    return loaded_image(rgb)


def loaded_image(rgb: Image.Image) -> LoadedImage:
    """An RGB Pillow image as a :class:`LoadedImage` (its pixels and their digest)."""
    pixels = rgb.tobytes()
    digest = hashlib.sha256(pixels + f"{rgb.width}x{rgb.height}".encode()).hexdigest()
    return LoadedImage(pixels, rgb.width, rgb.height, digest)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bits rather than clip (Pillow's convert clips).
        image = image.point(lambda value: value / 256).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")
