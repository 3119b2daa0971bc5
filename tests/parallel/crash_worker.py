"""Run `lathe train` and kill the process (os._exit) at a chosen point of the N-th checkpoint save.

    python crash_worker.py POINT N [train options...]

POINT: dcp_write (while shard files are written), before_commit (every shard and DCP's metadata
written, before lathe commits the checkpoint by renaming its folder).
"""

import os
import sys

point, nth, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = {"n": 0}


def crash_on_nth(original):
    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth:
            sys.stdout.flush()
            os._exit(9)  # like a kill -9: no cleanup, no finally blocks
        return original(*args, **kwargs)
    return wrapper


if point == "dcp_write":
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    FileSystemWriter.write_data = crash_on_nth(FileSystemWriter.write_data)
elif point == "before_commit":
    from lathe.checkpoint.manager import CheckpointManager

    CheckpointManager._commit = crash_on_nth(CheckpointManager._commit)
else:
    raise SystemExit(f"unknown point {point}")

from lathe.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *argv]))
