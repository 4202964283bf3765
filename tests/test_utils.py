"""memtrans.utils: atomic writes leave files as a plain open would (readable by others under the umask)."""
import contextlib
import os
import stat

from memtrans import utils


def test_atomic_writes_follow_the_umask_not_mkstemps_0600(tmp_path, monkeypatch):
    for mask in (0o022, 0o077):
        monkeypatch.setattr(utils, "_UMASK", mask)
        path = tmp_path / f"r{mask:o}.json"
        utils.atomic_write_json(path, {"a": 1})
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
        assert utils.read_json(path) == {"a": 1}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


CHILD = """
import sys, time
from memtrans.utils import Interrupted, handle_signals, stop_with_parent
try:
    with handle_signals():
        assert stop_with_parent(0.05)
        print('watching', flush=True)
        time.sleep(60)
except Interrupted as e:
    sys.exit(e.exit_code)
"""
PARENT = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, '-c', sys.argv[1]], env={**os.environ, 'MEMTRANS_PARENT_PID': str(os.getpid())},
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
assert child.stdout.readline().strip() == 'watching'
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_child_of_ablate_stops_when_its_parent_is_killed():
    """ablate's children run in their own sessions, so a SIGKILL of ablate never reaches them: they watch it."""
    import signal
    import subprocess
    import sys
    import time
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    try:
        time.sleep(0.3)
        os.kill(child_pid, 0)  # alive while its parent is
        parent.kill()
        parent.wait()
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                os.kill(child_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the child outlived its killed parent")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child_pid, signal.SIGKILL)
        parent.kill()


def test_without_the_variable_nothing_watches(monkeypatch):
    monkeypatch.delenv("MEMTRANS_PARENT_PID", raising=False)
    assert not utils.stop_with_parent()
    monkeypatch.setenv("MEMTRANS_PARENT_PID", "nonsense")
    assert not utils.stop_with_parent()
