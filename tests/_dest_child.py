"""A ``zero-ckpt`` CLI process that stops after its N-th committed output file (not a test).

``python tests/_dest_child.py pause N -- ARGS...`` runs ``zero-ckpt ARGS...``; after the N-th
``FileWriter.commit`` returns it prints ``paused`` on stdout and blocks until a line arrives on
stdin, then carries on (so a test holds a job mid-write while it starts another one).
``kill N`` SIGKILLs itself at that point instead (an interrupted job). Used by
``tests/test_bad_outputs.py``; synchronisation is the pipe, nothing sleeps.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    mode, n, sep, *args = sys.argv[1:]
    assert sep == "--" and mode in ("pause", "kill"), sys.argv
    at = int(n)
    from zero_ckpt import storage

    original = storage.FileWriter.commit
    count = [0]

    def commit(self, fsync=None):
        first = not self._closed
        original(self, fsync)
        if not first:
            return
        count[0] += 1
        if count[0] == at:
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            sys.stdout.write("paused\n")
            sys.stdout.flush()
            sys.stdin.readline()

    storage.FileWriter.commit = commit
    from cli.main import main as cli_main

    cli_main(args)


if __name__ == "__main__":
    main()
