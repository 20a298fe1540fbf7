"""ZeroMQ CURVE authentication for the server: only clients whose public key is on file get in."""

from __future__ import annotations

import logging
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

logger = logging.getLogger(__name__)


def start_curve(ctx: zmq.Context, router: zmq.Socket, secret_file: Path, clients_dir: Path | None) -> ThreadAuthenticator:
    """Make ``router`` a CURVE server with the key pair in ``secret_file``, admitting only the
    clients whose public key files (``*.key``, from ``fgc-bank keys``) are in ``clients_dir``."""
    if clients_dir is None or not Path(clients_dir).is_dir():
        raise ValueError(f"CURVE needs a directory of authorised client public keys, got {clients_dir}")
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key; pass the server's .key_secret file")
    auth = ThreadAuthenticator(ctx)
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
