"""The security guards in the fast tier (test_bad_input.py checks them again through the command
line on the pipeline's own artifacts, but only as an integration test):

* every torch.load in the package is weights_only=True (static), no np.load allows pickles,
  and a checkpoint holding code is refused without running it;
* tar members that name anything but NNNNNNNN.{jpg,png,cls} (absolute paths, `..`, folders,
  links) are refused by both shard readers, and nothing is written outside;
* a manifest naming a file outside its folder is refused;
* a write that fails half-way (a full disk) leaves neither the checkpoint nor a temporary."""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, write_shards

from dinosae.checkpoint import load_checkpoint, save_checkpoint
from dinosae.data.loader import make_loader
from dinosae.data.shard import iter_shard, read_manifest
from dinosae.errors import CheckpointError, DataError

# ---------------------------------------------------------------- checkpoints

def _calls(attr: str, module: str, root: Path = ROOT) -> list[tuple[str, ast.Call]]:
    """Every `<module>.<attr>(...)` call in root/dinosae/ (also inside functions)."""
    out = []
    for path in sorted((root / "dinosae").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == attr and getattr(node.func.value, "id", "") == module):
                out.append((f"{path.relative_to(root)}:{node.lineno}", node))
    return out


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    kw = {k.arg: k.value for k in call.keywords}
    return isinstance(kw.get(name), ast.Constant) and kw[name].value is value


def test_every_torch_load_in_the_package_is_weights_only():
    calls = _calls("load", "torch")
    assert calls, "no torch.load found: the guard looks in the wrong place"
    bad = [where for where, c in calls if not _keyword_is(c, "weights_only", True)]
    assert not bad, f"torch.load without weights_only=True at {bad}"
    # and nothing else unpickles: no pickle.load(s), no np.load(allow_pickle=True)
    assert not _calls("load", "pickle") and not _calls("loads", "pickle")
    assert not [w for w, c in _calls("load", "np") if _keyword_is(c, "allow_pickle", True)]


def test_the_static_guard_sees_a_planted_call(tmp_path):
    """The guard has power: a torch.load without weights_only inside a function is found."""
    (tmp_path / "dinosae" / "sub").mkdir(parents=True)
    (tmp_path / "dinosae" / "sub" / "x.py").write_text(
        "import torch\n\ndef f(p):\n    return torch.load(p, weights_only=False)\n")
    calls = _calls("load", "torch", tmp_path)
    assert len(calls) == 1 and not _keyword_is(calls[0][1], "weights_only", True)


class _Evil:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_holding_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    good = {"kind": "dinosae-ae", "step": 3, "model": {"w": torch.ones(2)}}
    save_checkpoint(tmp_path / "good.pt", good)
    assert load_checkpoint(tmp_path / "good.pt")["step"] == 3
    evil = tmp_path / "evil.pt"
    torch.save({**good, "step": _Evil(marker)}, evil)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(evil)
    assert not marker.exists()
    (tmp_path / "cut.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a dinosae checkpoint"):
        load_checkpoint(tmp_path / "list.pt")


def test_a_full_disk_leaves_no_checkpoint_and_no_temporary(tmp_path):
    """RLIMIT_FSIZE makes writes past 100 kB fail as a full disk does (EFBIG)."""
    code = ("import resource, signal, torch\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
            "from dinosae.checkpoint import save_checkpoint\n"
            "try:\n"
            f"    save_checkpoint({str(tmp_path / 'ck.pt')!r}, {{'w': torch.ones(100_000)}})\n"
            "except OSError as e:\n"
            "    print('OSError', e.errno)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert "OSError" in r.stdout, r.stdout + r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------- shards

@pytest.fixture
def shards(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    folder = tmp_path / "data" / "shards"
    write_shards(folder, imgs, [0, 1, 0, 1, 0, 1], [3, 3])
    return folder


def _replace_first_tar(shards: Path, members: list[tarfile.TarInfo]) -> Path:
    """The first tar rewritten with `members` (1-byte files unless given otherwise), the
    manifest's size and hash updated so that only the member names are wrong."""
    import hashlib

    tar = sorted(shards.glob("*.tar"))[0]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as t:
        for info in members:
            t.addfile(info, io.BytesIO(b"0" * info.size) if info.isfile() else None)
    m = json.loads((shards / "manifest.json").read_text())
    data = tar.read_bytes()
    m["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (shards / "manifest.json").write_text(json.dumps(m))
    return tar


def _file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 1
    return info


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


BAD_MEMBERS = {
    "parent": [_file("../escaped.cls")],
    "absolute": [_file("/tmp/dinosae-guard-absolute.cls")],
    "dotdot": [_file("sub/../../escaped.cls")],
    "prefix": [_file("a" * 90 + "/00000000.cls")],  # ustar: the folder goes to the prefix field
    "folder": [_file("x/00000000.cls")],
    "other extension": [_file("00000000.py")],
    "symlink": [_link("00000000.cls", "/etc/passwd", tarfile.SYMTYPE)],
    "hardlink": [_link("00000000.cls", "../escaped.cls", tarfile.LNKTYPE)],
}


@pytest.mark.parametrize("case", list(BAD_MEMBERS))
def test_tar_members_naming_other_paths_are_refused(shards, tmp_path, case):
    tar = _replace_first_tar(shards, BAD_MEMBERS[case])
    read_manifest(shards)  # the manifest agrees with the tar: only the member is wrong
    with pytest.raises(DataError, match="unexpected member|not written by dinosae"):
        list(iter_shard(tar))
    with pytest.raises(DataError, match="unexpected|not written by dinosae"):
        for _ in make_loader(shards, 2, workers=0, train=False, drop_last=False):
            pass
    for where in (tmp_path, shards.parent, shards, tmp_path / "data"):
        assert not (where / "escaped.cls").exists()
    assert not Path("/tmp/dinosae-guard-absolute.cls").exists()


def test_good_members_are_read(shards):
    """(The bad cases above fail for their names, not because the readers refuse everything.)"""
    assert [i for i, _, _ in iter_shard(sorted(shards.glob("*.tar"))[0])] == [0, 1, 2]
    n = sum(len(b[0]) for b in make_loader(shards, 2, workers=0, train=False, drop_last=False))
    assert n == 6


@pytest.mark.parametrize("name", ["../elsewhere.tar", "/tmp/x.tar", "sub/shard-000000.tar"])
def test_manifest_naming_a_file_outside_its_folder_is_refused(shards, name):
    m = json.loads((shards / "manifest.json").read_text())
    m["shards"][0]["name"] = name
    (shards / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="is not shard-NNNNNN.tar"):
        read_manifest(shards)
