"""TLS for the gRPC port and the metrics endpoint, with certificates reloaded while serving.

    files = CertificateFiles(cert, key, client_ca, require_client_cert)
    server.add_secure_port(address, files.grpc_credentials())     # grpc or grpc.aio
    context = files.ssl_context()                                  # the metrics endpoint

gRPC asks `files` for a new configuration before every TLS handshake (grpc's dynamic
ssl_server_credentials): when the files changed on disk, or after `reload()` (SIGHUP), the
next connection gets the new certificate; open connections and the server go on. A new pair
that does not load (a key that does not match, a half-written file) is logged and the old
one stays in use. Files are checked at start: a bad one stops the start (ValueError).
"""
from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable

import grpc

log = logging.getLogger(__name__)


def _stat(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror}") from None


class CertificateFiles:
    """The server's certificate chain, key and (for mTLS) client CA, as files."""

    def __init__(self, cert: str, key: str, client_ca: str = "", require_client_cert: bool = False):
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.require_client_cert = require_client_cert
        self._lock = threading.Lock()
        self._reload = False
        self._contexts: list[ssl.SSLContext] = []   # handed out by ssl_context(); reloaded too
        self._stamp = self._stamps()
        self._config = self._load()                 # raises ValueError: the start stops
        self._generation = self._grpc_generation = 0   # loads so far / the one gRPC has

    def _stamps(self) -> tuple:
        return tuple(_stat(p) for p in (self.cert, self.key, self.client_ca) if p)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert, key = _read(self.cert, "the TLS certificate"), _read(self.key, "the TLS key")
        ca = _read(self.client_ca, "the client CA") if self.client_ca else None
        self._check(ca)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _check(self, ca: bytes | None) -> None:
        """Load the files with Python's ssl: a broken file or a key that does not match fails here."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key)
            if ca is not None:
                context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise ValueError(f"TLS files {self.cert} / {self.key}"
                             f"{' / ' + self.client_ca if self.client_ca else ''} do not load: {exc}") from None

    def reload(self) -> None:
        """Re-read the files for the next connection (SIGHUP)."""
        with self._lock:
            self._reload = True
        self._refresh()

    def _refresh(self) -> None:
        """Load the files again if they changed (or a reload was asked for)."""
        with self._lock:
            stamp = self._stamps()
            if not self._reload and stamp == self._stamp:
                return
            self._reload, self._stamp = False, stamp
            try:
                config = self._load()
            except ValueError as exc:
                log.error("TLS certificate reload failed, keeping the current certificate: %s", exc)
                return
            for context in self._contexts:
                context.load_cert_chain(self.cert, self.key)
                if self.client_ca:
                    context.load_verify_locations(self.client_ca)
            self._config, self._generation = config, self._generation + 1
            log.info("TLS certificate reloaded from %s", self.cert)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher, before every handshake: a configuration gRPC has not seen yet, else None."""
        self._refresh()
        with self._lock:
            if self._grpc_generation == self._generation:
                return None
            self._grpc_generation = self._generation
            return self._config

    def _on_handshake(self, _socket, _server_name, _context) -> None:
        """Each HTTPS handshake looks at the files too (the next connection gets a new pair)."""
        self._refresh()

    def grpc_credentials(self) -> grpc.ServerCredentials:
        # grpc's stub says the fetcher returns a configuration; grpc also takes None (no change).
        fetch: Callable[[], grpc.ServerCertificateConfiguration] = self._fetch  # type: ignore[assignment]
        return grpc.dynamic_ssl_server_credentials(
            self._config, fetch, require_client_authentication=self.require_client_cert)

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side context with the same files (the metrics endpoint); reloaded with them."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca:
            context.load_verify_locations(self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        context.sni_callback = self._on_handshake
        with self._lock:
            self._contexts.append(context)
        return context


def certificate_files(settings) -> CertificateFiles | None:
    """From ServeSettings: None without --tls-cert."""
    if not settings.tls_cert:
        return None
    return CertificateFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca,
                            settings.tls_require_client_cert)
