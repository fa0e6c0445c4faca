"""Frame index of input files (distmlip.data.frames): the extxyz scan against ASE's reader,
chunked reading, and the split of the frames of all files over ranks."""
from __future__ import annotations

import numpy as np
import pytest

from distmlip.data.examples import emt_structures
from distmlip.data.frames import index_file, iter_frames, scan_extxyz, split_frames
from distmlip.errors import InputError


@pytest.fixture(scope="module")
def xyz(tmp_path_factory):
    import ase.io

    p = tmp_path_factory.mktemp("frames") / "a.extxyz"
    structs = emt_structures(20, seed=3)
    ase.io.write(p, [s.to_ase() for s in structs], format="extxyz")
    return p, structs


def test_scan_matches_ase_and_small_blocks(xyz):
    import ase.io

    p, structs = xyz
    offs = scan_extxyz(p)
    assert len(offs) == 21 and offs[0] == 0 and offs[-1] == p.stat().st_size
    # block sizes smaller than a line: the same offsets
    assert np.array_equal(scan_extxyz(p, block=7), offs)
    text = p.read_bytes()
    for k in (0, 7, 19):
        frame = text[offs[k]:offs[k + 1]].decode()
        assert int(frame.split("\n", 1)[0]) == structs[k].natoms
        a = ase.io.read(p, index=k)
        np.testing.assert_array_equal(a.numbers, structs[k].numbers)


def test_scan_rules_vec_blank_no_newline(tmp_path):
    import ase.io

    p = tmp_path / "v.extxyz"
    # a frame with VEC lines, a frame without a trailing newline
    first = "2\ncomment\nH 0 0 0\nH 0 0 1\nVEC1 5 0 0\nVEC2 0 5 0\nVEC3 0 0 5\n"
    p.write_text(first + "1\nenergy=-1.0\nHe 1 1 1")
    offs = scan_extxyz(p)
    assert list(offs) == [0, len(first), p.stat().st_size]
    assert len(ase.io.read(p, index=":")) == 2
    # ASE stops at a blank line between frames (files joined with `cat`): every later frame was
    # lost with exit 0; the scan reads on, and the frames (an empty comment line included) arrive
    p.write_text("1\nenergy=-1.0\nH 0 0 0\n\n\n1\n\nH 0 0 1\n\n1\nenergy=-3.0\nH 0 0 2\n\n")
    assert len(ase.io.read(p, index=":", format="extxyz")) == 1
    offs = scan_extxyz(p)
    assert len(offs) == 4
    got = [s for chunk, _ in iter_frames(index_file(str(p)), 0, 3, chunk_bytes=1 << 20) for s in chunk]
    assert [s.positions[0, 2] for s in got] == [0.0, 1.0, 2.0]
    assert got[0].energy == -1.0 and got[2].energy == -3.0
    # a blank line at the end only: nothing more
    p.write_text("1\nx\nH 0 0 0\n\n\n")
    assert len(scan_extxyz(p)) == 2
    p.write_text("1\nx\nH 0 0 0\n3\nx\nH 0 0 0\n")
    with pytest.raises(InputError, match=r"frame 1: file ends inside the frame"):
        scan_extxyz(p)
    p.write_text("1\nx\nH 0 0 0\nabc\nx\n")
    with pytest.raises(InputError, match=r"v.extxyz:4: frame 1: expected the atom count"):
        scan_extxyz(p)
    # a count one too high makes frame 0 swallow frame 1's count line: both are named
    p.write_text("2\nx\nH 0 0 0\n1\nx\nH 0 0 0\n")
    with pytest.raises(InputError, match=r"v.extxyz:5: frame 1: .*'x' \(or frame 0, whose count line 1 "
                                         r"announces 2 atoms, has another number of atom lines\)"):
        scan_extxyz(p)
    p.write_text("")
    with pytest.raises(InputError, match="empty file"):
        index_file(str(p))


def test_iter_frames_chunks_bounded_and_exact(xyz):
    p, structs = xyz
    ff = index_file(str(p))
    assert ff.kind == "extxyz" and ff.n == 20
    got, sizes = [], []
    for chunk, nbytes in iter_frames(ff, 4, 17, chunk_bytes=2000):
        sizes.append((len(chunk), nbytes))
        got += chunk
    assert [s.source_index for s in got] == list(range(4, 17))
    # each chunk holds at most chunk_bytes of text, or a single larger frame
    assert all(nb <= 2000 or n == 1 for n, nb in sizes) and len(sizes) > 3
    assert sum(nb for _, nb in sizes) == ff.offsets[17] - ff.offsets[4]
    for s in got:
        ref = structs[s.source_index]
        np.testing.assert_allclose(s.positions, ref.positions, atol=1e-7)
        assert s.energy == pytest.approx(ref.energy, abs=1e-7)


def test_split_frames_contiguous_balanced(tmp_path, xyz):
    from distmlip.data.frames import FileFrames

    p, _ = xyz
    big = index_file(str(p))
    xsf = [FileFrames(f"s{k}.xsf", "xsf", None, 1, 500) for k in range(5)]
    files = xsf[:2] + [big] + xsf[2:]
    total = sum(ff.weights().sum() for ff in files)
    for size in (1, 2, 3, 7, 40):
        parts = split_frames(files, size)
        assert len(parts) == size
        flat = [(f, k) for segs in parts for f, lo, hi in segs for k in range(lo, hi)]
        assert flat == [(f, k) for f, ff in enumerate(files) for k in range(ff.n)]   # order, cover
        if size <= 3:
            loads = [sum(files[f].weights()[lo:hi].sum() for f, lo, hi in segs) for segs in parts]
            assert max(loads) - min(loads) <= 2 * max(ff.weights().max() for ff in files), loads
    assert abs(sum(ff.weights().sum() for ff in files) - total) < 1e-9
