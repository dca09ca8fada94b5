"""A folder the test process cannot write to, for the tests of iaerf's output-folder checks."""
import os
import tempfile
import traceback

import torch


def run_without_write_access(fn):
    """Call ``fn(folder)`` with ``folder`` an existing folder the calling process cannot write to.

    Root ignores permission bits, so under root ``fn`` runs in a forked child that has dropped to the ``nobody``
    user (65534); the child's failure (its traceback is printed) fails the test.
    """
    base = tempfile.mkdtemp(prefix="iaerf-ro-")
    folder = os.path.join(base, "ro")
    os.mkdir(folder)
    try:
        os.chmod(base, 0o755)  # the child must reach the folder, just not write in it
        os.chmod(folder, 0o555)
        if os.geteuid() != 0:
            fn(folder)
            return
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit status
            code = 1
            try:
                torch.set_num_threads(1)
                os.setgid(65534)
                os.setuid(65534)
                fn(folder)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the check failed in the unprivileged child"
    finally:
        os.chmod(folder, 0o755)
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)
        os.rmdir(base)
