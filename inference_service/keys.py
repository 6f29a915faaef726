"""`python -m inference_service.keys DIR`: CURVE key pairs for a service reachable off loopback.

Writes
  DIR/server.key_secret            the server's key pair   -> chatpose-serve --curve-secret-key
  DIR/server.key                   the server's public key -> give it to every client
  DIR/client.key_secret            a client's key pair     -> the client (add-on preferences)
  DIR/authorized_clients/client.key   that client's public key -> chatpose-serve --curve-clients
Add more clients with --client NAME; each one's public key lands in authorized_clients/.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import zmq.auth


def make_keys(directory: Path, client_names: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    authorized = directory / "authorized_clients"
    authorized.mkdir(exist_ok=True)
    if not (directory / "server.key_secret").exists():  # never replace a key clients trust
        zmq.auth.create_certificates(directory, "server")
    for name in client_names:
        public, _secret = zmq.auth.create_certificates(directory, name)
        shutil.move(public, authorized / Path(public).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m inference_service.keys",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", type=Path)
    parser.add_argument(
        "--client",
        action="append",
        dest="clients",
        metavar="NAME",
        help="a client key pair to make (default: one named 'client')",
    )
    args = parser.parse_args(argv)
    make_keys(args.directory, args.clients or ["client"])
    print(f"keys written to {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
