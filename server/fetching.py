"""Fetching the images a JSON edit names by URL, without becoming a proxy into our network.

``images: [{"image_url": "https://..."}]`` makes the gateway fetch a URL the caller
chose. Unchecked, that lets any caller reach what only the gateway can: the cloud metadata
service, the database, an admin port on loopback (server-side request forgery). So:

* only ``https`` (``http`` only for allowlisted hosts, such as a test fake on loopback);
* the host is resolved here, and every address it resolves to must be public: loopback,
  private, link-local (cloud metadata at 169.254.169.254), multicast, reserved and
  unspecified addresses are refused unless the operator allowlists the host or a network
  containing it (``IMAGEGW_IMAGE_URL_ALLOWLIST``). An IPv6 address that carries an IPv4
  one a gateway on the way translates to (IPv4-mapped, 6to4, NAT64's ``64:ff9b::/96``) is
  judged by that IPv4 address: ``64:ff9b::a9fe:a9fe`` is the metadata service;
* the connection goes to the address that was checked (the URL's host stays in the
  ``Host`` header and the TLS server name), so a second DNS answer cannot redirect it;
* no redirects are followed; the body is read up to the file limit (or what is left of
  the request's total) and the whole fetch must finish within ``timeout`` seconds, the
  lookup of its name included.

Bodies are spooled as uploads are (memory up to ``spool_bytes``, then a temporary file
written from a worker thread), so sixteen 50 MB images do not sit in memory.

Every refusal is a 400 naming the ``param`` (the URL's place in the request).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import tempfile
from collections.abc import Iterable
from typing import BinaryIO, cast

import httpx

from server.errors import InvalidRequestError, PayloadTooLargeError

__all__ = ["ImageFetcher"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Written to the spool in pieces of this size: a thread hop for each, not for each chunk.
_WRITE_BYTES = 1024 * 1024


async def _write(spool: BinaryIO, data: bytearray) -> None:
    # Past its memory threshold a spool writes to disk: off the event loop.
    if data:
        await asyncio.to_thread(spool.write, data)


class ImageFetcher:
    """Fetches caller-named image URLs with the checks above."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        allowlist: Iterable[str],
        max_bytes: int,
        max_total_bytes: int,
        timeout: float,
        spool_bytes: int,
    ) -> None:
        self._client = client
        self._hosts: set[str] = set()
        self._networks: list[Network] = []
        for entry in allowlist:
            entry = entry.strip().lower()
            if not entry:
                continue
            try:
                self._networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self._hosts.add(entry)
        self._max_bytes = max_bytes
        self._max_total_bytes = max_total_bytes
        self._timeout = timeout
        self._spool_bytes = spool_bytes

    async def fetch(self, url: str, *, param: str, fetched_before: int = 0) -> tuple[BinaryIO, int]:
        """The body of ``url`` (a spooled file, rewound; the caller closes it) and its size;
        a 400 (or 413) naming ``param`` when it may not or cannot be fetched.
        ``fetched_before``: the bytes this request's other images took, which count
        against the total limit of uploads."""
        # SpooledTemporaryFile is a binary file in all but its declared type.
        spool = cast(BinaryIO, tempfile.SpooledTemporaryFile(max_size=self._spool_bytes))  # noqa: SIM115 - the caller closes it
        try:
            size = await self._fetch_into(spool, url, param, self._max_total_bytes - fetched_before)
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool, size

    async def _fetch_into(self, spool: BinaryIO, url: str, param: str, budget: int) -> int:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise InvalidRequestError(f"Invalid '{param}': not a URL.", param=param, code="invalid_image_url") from exc
        host = (parsed.host or "").lower()
        if not host:
            raise InvalidRequestError(f"Invalid '{param}': the URL has no host.", param=param, code="invalid_image_url")
        allowlisted_host = host in self._hosts
        if parsed.scheme != "https" and not (parsed.scheme == "http" and (allowlisted_host or self._literal_allowed(host))):
            raise InvalidRequestError(
                f"Invalid '{param}': image URLs must be https (or data: URLs).", param=param, code="invalid_image_url"
            )
        extensions = {"sni_hostname": host} if parsed.scheme == "https" else {}
        try:
            # One bound for the whole fetch, the name's lookup included (a slow resolver
            # must not hold the request past it).
            async with asyncio.timeout(self._timeout):
                address = await self._checked_address(host, parsed.port or (443 if parsed.scheme == "https" else 80), param)
                target = parsed.copy_with(host=address)
                async with self._client.stream(
                    "GET", target, headers={"host": parsed.netloc.decode()}, extensions=extensions
                ) as response:
                    if response.status_code != 200:
                        raise InvalidRequestError(
                            f"Invalid '{param}': fetching the image URL gave HTTP {response.status_code}.",
                            param=param,
                            code="image_url_unavailable",
                        )
                    size, pending = 0, bytearray()
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > self._max_bytes:
                            raise PayloadTooLargeError(
                                f"Invalid '{param}': the image at the URL is larger than the server's limit of "
                                f"{self._max_bytes} bytes.",
                                param=param,
                            )
                        if size > budget:
                            raise PayloadTooLargeError(
                                f"Invalid '{param}': the request's images together are larger than the server's "
                                f"limit of {self._max_total_bytes} bytes.",
                                param=param,
                            )
                        pending += chunk
                        if len(pending) >= _WRITE_BYTES:
                            await _write(spool, pending)
                            pending = bytearray()
                    await _write(spool, pending)
        except TimeoutError as exc:
            raise InvalidRequestError(
                f"Invalid '{param}': the image URL did not answer within {self._timeout:g} s.",
                param=param,
                code="image_url_unavailable",
            ) from exc
        except httpx.HTTPError as exc:
            # The exception's class is httpx's vocabulary (ConnectError, RemoteProtocolError).
            raise InvalidRequestError(
                f"Invalid '{param}': the image URL could not be fetched (the connection failed or the answer was "
                "not valid HTTP).",
                param=param,
                code="image_url_unavailable",
            ) from exc
        return size

    def _literal_allowed(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._networks)

    async def _checked_address(self, host: str, port: int, param: str) -> str:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except UnicodeError as exc:
            # The IDNA encoding refuses it (a label over 63 characters, an empty label).
            raise InvalidRequestError(
                f"Invalid '{param}': the image URL's host is not a valid host name.", param=param, code="invalid_image_url"
            ) from exc
        except OSError as exc:
            raise InvalidRequestError(
                f"Invalid '{param}': the image URL's host does not resolve.", param=param, code="image_url_unavailable"
            ) from exc
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        allowed_host = host in self._hosts
        for address in addresses:
            if allowed_host or any(address in network for network in self._networks):
                continue
            if _forbidden(address):
                raise InvalidRequestError(
                    f"Invalid '{param}': the image URL points into a private or local network, which this server "
                    "does not fetch from.",
                    param=param,
                    code="image_url_forbidden",
                )
        first = addresses[0]
        return f"[{first}]" if first.version == 6 else str(first)


# NAT64's well-known prefix (RFC 6052): the last 32 bits are the IPv4 address it reaches.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _forbidden(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Not a public unicast address, or an IPv6 form of an IPv4 address that is not."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
        if embedded is not None:
            return _forbidden(embedded)
    # Reserved: IPv4's 240/4 and IPv6's unassigned blocks, IPv4-compatible ::/96 and
    # local-use NAT64 (64:ff9b:1::/48) among them, which is_global lets through.
    return not address.is_global or address.is_multicast or address.is_reserved
