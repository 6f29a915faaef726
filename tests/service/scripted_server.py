"""A scripted service in its own process, for tests that kill it: `python scripted_server.py
ADDRESS [--stall-after N]` answers N pose items, then stalls inside the model for ever."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scripted_backend import ScriptedBackend  # noqa: E402

from inference_service.server import Server  # noqa: E402


class StallingBackend(ScriptedBackend):
    def __init__(self, stall_after: int | None) -> None:
        super().__init__()
        self._left = stall_after

    def answer_poses(self, items):  # one item per call: the server runs with max_batch=1
        if self._left is not None:
            if self._left == 0:
                threading.Event().wait()  # stuck for good: only a kill ends this process
            self._left -= 1
        return super().answer_poses(items)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("--stall-after", type=int)
    args = parser.parse_args()
    backend = StallingBackend(args.stall_after)
    server = Server(backend, backend.info, args.address, max_batch=1)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
