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
import datetime
import os
import sys
from pathlib import Path

import zmq.auth

from inference_service.commands import user_path
from shared_protocol.client import is_curve_key


class KeysError(ValueError):
    """A key directory or client name that cannot be used; the message says why."""


def make_keys(directory: Path, client_names: list[str]) -> list[str]:
    """Makes the server's key pair if there is none, and a key pair per new client name.
    Existing keys are never replaced (clients and the server trust them); returns the names of
    the clients made. Secret keys are readable by their owner only."""
    for name in client_names:
        if not name or name == "server" or not name.replace("-", "").replace("_", "").isalnum():
            raise KeysError(
                f"client name {name!r}: use letters, digits, '-' and '_' (not 'server')"
            )
    if directory.exists() and not directory.is_dir():
        raise KeysError(f"{directory} is a file, not a folder")
    if directory.is_symlink() and not directory.exists():  # not made through a link
        raise KeysError(
            f"{directory} is a link to {os.readlink(directory)}, which is not there: make that "
            "folder first, or name another"
        )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    authorized = directory / "authorized_clients"
    authorized.mkdir(exist_ok=True)
    pairs = []  # (secret file, public file) of each pair to make
    if not (directory / "server.key_secret").exists():  # never replace a key clients trust
        pairs.append((directory / "server.key_secret", directory / "server.key"))
    else:
        _check_server_keys(directory)
    made = []
    for name in client_names:
        if (directory / f"{name}.key_secret").exists() or (authorized / f"{name}.key").exists():
            continue  # that user already has a key: a new one would lock them out
        if name not in made:
            pairs.append((directory / f"{name}.key_secret", authorized / f"{name}.key"))
            made.append(name)
    for path in (path for pair in pairs for path in pair):  # all, before any key is written
        _check_new_key_file(path)
    for secret_file, public_file in pairs:
        _create(secret_file, public_file)
    return made


def _check_server_keys(directory: Path) -> None:
    """The server's key pair kept: KeysError for one that is no key pair (this tool keeps it,
    so that running it again would change nothing); its public half written again when it
    went missing (every client needs it)."""
    secret_file, public_file = directory / "server.key_secret", directory / "server.key"
    try:  # an OSError (not readable by this user) is said as it is: the pair may be fine
        secret = zmq.auth.load_certificate(secret_file)[1]
    except (ValueError, IndexError):  # IndexError: a key line without "="
        secret = None
    if secret is None or not is_curve_key(secret):
        raise KeysError(
            f"{secret_file} is not a CURVE key pair; it is kept, as clients may trust it: move "
            "it away and run this again for a new server key pair (every client then needs "
            "the new server.key)"
        )
    if public_file.is_symlink() and not public_file.exists():  # never written through a link
        print(
            f"note: {public_file} is a link to nothing; remove it and run this again to write "
            "the file"
        )
    elif not public_file.exists():
        # The secret's own public key, whatever its file says besides.
        _write_key(public_file, zmq.curve_public(secret))
        print(f"wrote {public_file} again, from {secret_file.name}")
    elif not public_file.is_file():
        print(
            f"note: {public_file} is not a file, and every client needs it: remove it and run "
            "this again"
        )


def _default_clients(directory: Path) -> list[str]:
    """The clients made when none is named: 'client' in a new folder, or where 'client' has a
    key already (kept, and said to be revoked if it is: a first run cut short); none in a
    folder other clients use (run again to write a lost server.key, it authorises nobody)."""
    own = (directory / "client.key_secret", directory / "authorized_clients" / "client.key")
    if any(path.exists() or path.is_symlink() for path in own):
        return ["client"]
    secrets = (p for p in directory.glob("*.key_secret") if p.name != "server.key_secret")
    others = any(secrets) or any((directory / "authorized_clients").glob("*.key"))
    return [] if others else ["client"]


def _check_new_key_file(path: Path) -> None:
    """KeysError for a place a new key file cannot go: a link, dangling or not (a key written
    through one planted there lands wherever it points), or something other than a file."""
    if path.is_symlink():
        raise KeysError(
            f"{path} is a link (to {os.readlink(path)}), and a new key is never written "
            "through one: remove the link and run this again"
        )
    if path.exists() and not path.is_file():
        raise KeysError(f"{path} is not a file: remove it and run this again")


def _create(secret_file: Path, public_file: Path) -> None:
    """A new key pair: the pair in `secret_file`, its public half in `public_file` (both
    checked by `_check_new_key_file`)."""
    public, secret = zmq.curve_keypair()
    # A public half left without its secret (a server.key of a pair deleted) belongs to no
    # key any more: it is replaced, as the new one must be handed out.
    public_file.unlink(missing_ok=True)
    _write_key(secret_file, public, secret)
    _write_key(public_file, public)


# As zmq.auth.create_certificates writes them (what zmq.auth.load_certificate and czmq read),
# with a new file only.
_SECRET_BANNER = """\
#   ****  Generated on {now} by python -m inference_service.keys  ****
#   ZeroMQ CURVE **Secret** Certificate
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

"""
_PUBLIC_BANNER = """\
#   ****  Generated on {now} by python -m inference_service.keys  ****
#   ZeroMQ CURVE Public Certificate
#   Exchange securely, or use a secure mechanism to verify the contents
#   of this file after exchange.

"""


def _write_key(path: Path, public: bytes, secret: bytes | None = None) -> None:
    """A new key file at `path`: owner-only for a secret key from the moment it exists (a chmod
    after writing leaves it readable by others for a moment in a folder that already was),
    readable by all for a public one. Never through a link, nor over a file that is there:
    O_EXCL refuses both, even one put there after `_create` looked (KeysError)."""
    mode = 0o644 if secret is None else 0o600
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        descriptor = os.open(path, flags, mode)
    except FileExistsError:
        raise KeysError(
            f"{path} appeared while this ran (a link or a file), and a new key is never written "
            "through or over one: remove it if it is not a key of yours and run this again"
        ) from None
    now = datetime.datetime.now()
    text = (_PUBLIC_BANNER if secret is None else _SECRET_BANNER).format(now=now)
    text += f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret.decode()}"\n'
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        if hasattr(os, "fchmod"):
            os.fchmod(descriptor, mode)  # the umask may have taken bits of a public key's mode
        file.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m inference_service.keys",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", type=user_path)
    parser.add_argument(
        "--client",
        action="append",
        dest="clients",
        metavar="NAME",
        help="a client key pair to make (default: one named 'client' in a folder that has no "
        "client keys yet)",
    )
    args = parser.parse_args(argv)
    try:
        # Run again on a folder in use (to write a lost server.key, or a new server pair), it
        # authorises nobody new unless asked to.
        names = args.clients or _default_clients(args.directory)
        server_kept = (args.directory / "server.key_secret").exists()
        made = make_keys(args.directory, names)
    except KeysError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the keys of another user (their folder is theirs alone)
        print(
            f"error: cannot use {exc.filename or args.directory} ({exc.strerror}): run this as "
            "the user whose keys they are",
            file=sys.stderr,
        )
        return 2
    except zmq.ZMQError as exc:  # a libzmq without CURVE
        print(f"error: this ZeroMQ cannot make CURVE keys ({exc})", file=sys.stderr)
        return 2
    kept = [name for name in names if name not in made]
    print(f"keys in {args.directory}: made {', '.join(made) or 'no new client'}", end="")
    print(f"; kept the existing keys of {', '.join(kept)}" if kept else "")
    if not server_kept:  # new: every client needs it, those given an older one too
        print(f"new server key pair: give {args.directory / 'server.key'} to every client")
    authorized = args.directory / "authorized_clients"
    for name in kept:
        if not (authorized / f"{name}.key").exists():  # revoked: kept keys would not let it in
            print(
                f"note: {name} is not authorized (no authorized_clients/{name}.key: revoked); to "
                f"give it a new key pair, delete {args.directory / (name + '.key_secret')} and "
                "run this again",
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
