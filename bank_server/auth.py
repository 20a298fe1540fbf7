"""ZeroMQ CURVE authentication for the server: only clients whose public key is on file get in."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

logger = logging.getLogger(__name__)
REFUSAL_LOG_S = 10.0  # at most one log line per this many seconds: a flood of handshakes is not a flood of logs


class LoggingAuthenticator(ThreadAuthenticator):
    """pyzmq's authenticator, which logs refused CURVE clients (pyzmq logs them at debug only):
    the first at once, then a count at most every ``REFUSAL_LOG_S`` seconds."""

    refused = 0  # handshakes refused since start
    _logged_at = float("-inf")
    _unlogged = 0

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        allowed, reason = await super()._authenticate_curve(domain, client_key)
        if not allowed:
            self.refused += 1
            self._unlogged += 1
            now = time.monotonic()
            if now - self._logged_at >= REFUSAL_LOG_S:
                logger.warning("refused %d CURVE handshake(s) (%s); the latest client key %s is not among "
                               "the --curve-clients keys", self._unlogged, reason.decode(errors="replace"),
                               z85.encode(client_key).decode())
                self._logged_at, self._unlogged = now, 0
        return allowed, reason


def start_curve(ctx: zmq.Context, router: zmq.Socket, secret_file: Path, clients_dir: Path | None) -> LoggingAuthenticator:
    """Make ``router`` a CURVE server with the key pair in ``secret_file``, admitting only the
    clients whose public key files (``*.key``, from ``fgc-bank keys``) are in ``clients_dir``."""
    if clients_dir is None or not Path(clients_dir).is_dir():
        raise ValueError(f"CURVE needs a directory of authorised client public keys, got {clients_dir}")
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key; pass the server's .key_secret file")
    auth = LoggingAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(clients_dir))
    router.curve_secretkey = secret
    router.curve_publickey = public
    router.curve_server = True
    logger.info("CURVE on: admitting client keys in %s", clients_dir)
    return auth


def make_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """Write a CURVE key pair ``name.key`` (public) and ``name.key_secret`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)
