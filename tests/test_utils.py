"""memtrans.utils: atomic writes leave files as a plain open would (readable by others under the umask)."""
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
