"""`chatpose`: the client command line.

Sub-commands are filled in by later issues; one that is not built yet exits with
EXIT_NOT_BUILT and says so, rather than pretending to work.
"""

from __future__ import annotations

import argparse
import sys

from shared_protocol import __version__

EXIT_NOT_BUILT = 3

# Sub-command -> the part of the project that builds it.
_PENDING = {
    "pose": "the client command line (use chatpose-serve with the protocol for now)",
    "batch": "the client command line (use chatpose-serve with the protocol for now)",
    "status": "the client command line (use chatpose-serve with the protocol for now)",
    "demo": "the bundled demo model and the end-to-end demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatpose", description="Ask a ChatPose service for SMPL poses from text and images."
    )
    parser.add_argument("--version", action="version", version=f"chatpose {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pose = commands.add_parser("pose", help="pose from a text prompt and/or an image")
    pose.add_argument("text", help="what the person should do")
    pose.add_argument("--image", metavar="FILE", help="a PNG or JPEG reference image")
    pose.add_argument("--json", action="store_true", help="print the protocol reply as JSON")
    pose.add_argument("--out", metavar="FILE.npz", help="write the poses as AMASS-layout .npz")

    batch = commands.add_parser("batch", help="one prompt per line, keyed as an animation")
    batch.add_argument("file", metavar="FILE.txt")
    batch.add_argument("--out", metavar="FILE.npz", required=True)
    batch.add_argument("--fps", type=float, default=30.0)

    commands.add_parser("status", help="the service's status")
    commands.add_parser("demo", help="what `make demo` runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    needs = _PENDING[args.command]
    print(
        f"chatpose {args.command}: not built yet in version {__version__}; it needs {needs}.",
        file=sys.stderr,
    )
    return EXIT_NOT_BUILT


if __name__ == "__main__":
    sys.exit(main())
