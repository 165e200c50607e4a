"""Atomic writes: whole files or none, with the modes a plain write would give them under the user's umask."""

import os
import stat

import numpy as np
import pytest

from captioner.io import atomic_path, make_shareable, save_json, save_npy, save_text


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_get_a_plain_files_modes_not_a_temp_files(tmp_path, umask):
    save_json(tmp_path / "a" / "x.json", {"k": 1})
    save_text(tmp_path / "t.txt", "hi")
    save_npy(tmp_path / "s.npy", np.arange(3, dtype=np.uint16))
    plain = tmp_path / "plain.txt"
    plain.write_text("reference")
    for name in ("a/x.json", "t.txt", "s.npy"):
        assert mode(tmp_path / name) == mode(plain) == 0o666 & ~umask, name
    assert (tmp_path / "a" / "x.json").read_text() == '{"k": 1}'


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "x.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_make_shareable_opens_a_private_temp_directory_like_mkdir(tmp_path, umask):
    private = tmp_path / "d"
    (private / "sub").mkdir(parents=True)
    (private / "sub" / "w.bin").write_bytes(b"1")
    for p in (private, private / "sub", private / "sub" / "w.bin"):
        p.chmod(0o700 if p.is_dir() else 0o600)
    make_shareable(private)
    assert mode(private) == mode(private / "sub") == 0o777 & ~umask
    assert mode(private / "sub" / "w.bin") == 0o666 & ~umask
