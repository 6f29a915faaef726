"""The `chatpose-serve` console command: the service, or one line naming the missing package on
a client-only install (`pip install .` has numpy and pyzmq, not the model's packages)."""

from __future__ import annotations

import sys


def chatpose_serve() -> int:
    from .cli import EXIT_USAGE, missing_service_package

    try:
        from .serve import main
    except ModuleNotFoundError as exc:
        print(f"chatpose-serve: {missing_service_package(exc)}", file=sys.stderr)
        return EXIT_USAGE
    return main()
