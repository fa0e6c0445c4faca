"""Shared infrastructure: config validation, atomic writes, CLI, compiled extension."""
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from distmlip.config import ConfigError, load_config
from distmlip.utils.io import atomic_path, atomic_write_text
from helpers import distmlip_cli


@dataclass
class _Optim:
    lr: float = 1e-3
    kind: Literal["adamw", "adam"] = "adamw"


@dataclass
class _Cfg:
    epochs: int = 10
    name: Optional[str] = None
    hidden: list[int] = field(default_factory=lambda: [10, 10])
    optim: _Optim = field(default_factory=_Optim)


def test_config_loads_and_coerces(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 3\nhidden: [5, 5]\noptim:\n  lr: 1\n")
    cfg = load_config(p, _Cfg)
    assert cfg.epochs == 3 and cfg.hidden == [5, 5] and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_unquoted_on_off_is_the_choice_not_a_boolean(tmp_path):
    from distmlip.training.config import load_train_config

    p = tmp_path / "t.yaml"
    p.write_text("data: {train: [x.h5]}\ntraining: {progress_bar: off}\n")
    assert load_train_config(p).training.progress_bar == "off"
    p.write_text("data: {train: [x.h5]}\ntraining: {progress_bar: on}\n")
    assert load_train_config(p).training.progress_bar == "on"


def test_config_unknown_key_lists_valid_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, _Cfg)
    msg = str(exc.value)
    assert "lerning_rate" in msg and "optim" in msg and "valid keys are: kind, lr" in msg and str(p) in msg


def test_config_type_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: ten\n")
    with pytest.raises(ConfigError, match="epochs.*integer"):
        load_config(p, _Cfg)
    p.write_text("optim: {kind: sgd}\n")
    with pytest.raises(ConfigError, match="not one of"):
        load_config(p, _Cfg)


def test_config_errors_from_overrides_say_so(tmp_path):
    """A typo in --set used to be reported as if it stood in the YAML file."""
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'lerning_rate'.* \(from --set optim.lerning_rate=0.1\)"):
        load_config(p, _Cfg, {"optim.lerning_rate": 0.1})
    with pytest.raises(ConfigError, match=r"'epochs'.*integer.*\(from --set epochs='ten'\)"):
        load_config(p, _Cfg, {"epochs": "ten"})
    with pytest.raises(ConfigError) as exc:      # the file's own error: no --set named
        p.write_text("epochz: 3\n")
        load_config(p, _Cfg, {"optim.lr": 0.1})
    assert "--set" not in str(exc.value)


def test_config_paths_expand_home_and_variables(tmp_path, monkeypatch):
    """'~' and $VARIABLES in path settings were taken literally: 'output: ~/runs/a' trained into a
    folder named '~' under the working directory (exit 0), '$SCRATCH/train.h5' did not exist
    (sweep 20).  They expand as in a shell; an unset variable is an error naming it."""
    from distmlip.training.config import load_train_config

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SW20_DATA", str(tmp_path / "scratch"))
    monkeypatch.chdir(tmp_path)
    y = tmp_path / "t.yaml"
    y.write_text("data: {train: [$SW20_DATA/a.h5, '${SW20_DATA}/b.h5']}\n"
                 "training: {output: ~/runs/a, warm_start: ~/m.pt}\ndescriptor: {cache_file: $SW20_DATA/c.h5}\n")
    cfg = load_train_config(y)
    assert cfg.data.train == [str(tmp_path / "scratch" / "a.h5"), str(tmp_path / "scratch" / "b.h5")]
    assert cfg.training.output == str(tmp_path / "home" / "runs" / "a")
    assert cfg.training.warm_start == str(tmp_path / "home" / "m.pt")
    assert cfg.descriptor.cache_file == str(tmp_path / "scratch" / "c.h5")
    cfg = load_train_config(y, {"training.output": "~/other"})          # --set / -o too
    assert cfg.training.output == str(tmp_path / "home" / "other")
    monkeypatch.delenv("SW20_DATA")
    with pytest.raises(ConfigError, match=r"data\.train.*SW20_DATA.*not set"):
        load_train_config(y)


def test_relative_config_paths_against_the_working_directory(tmp_path, monkeypatch, capsys):
    """Relative paths in a configuration are taken from the working directory.  A batch script
    that changed directory before the run got 'does not exist' naming the path alone, or silently
    trained on another file of the same name there (sweep 20): the first is now an error naming
    the file beside the configuration, the second a warning naming both."""
    from distmlip.training.config import load_train_config

    (tmp_path / "cfg").mkdir()
    (tmp_path / "job").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "cfg" / "train.h5").write_bytes(b"first")
    (tmp_path / "other" / "train.h5").write_bytes(b"second")
    y = tmp_path / "cfg" / "t.yaml"
    y.write_text("data: {train: [train.h5]}\ntraining: {output: run}\n")
    monkeypatch.chdir(tmp_path / "job")
    with pytest.raises(ConfigError, match=r"data\.train.*train\.h5 does not exist in the working directory") as err:
        load_train_config(y)
    assert str(tmp_path / "cfg" / "train.h5") in str(err.value)
    monkeypatch.chdir(tmp_path / "other")
    cfg = load_train_config(y)
    assert cfg.data.train == ["train.h5"]                  # the working directory's, as documented
    text = capsys.readouterr().err
    assert str(tmp_path / "other" / "train.h5") in text and str(tmp_path / "cfg" / "train.h5") in text, text
    monkeypatch.chdir(tmp_path / "cfg")                    # the usual case: nothing said
    load_train_config(y)
    assert capsys.readouterr().err == ""


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    f = tmp_path / "out.txt"
    atomic_write_text(f, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(f) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert f.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_refuses_a_target_that_is_not_a_plain_file(tmp_path):
    """`convert ... -o /dev/null` (a dry run) run as root renamed the data set onto /dev/null: the
    device became a plain file for every program on the machine.  A FIFO stands in for the device
    here; the write must stop naming the path and leave it as it was."""
    import os
    import stat

    from distmlip.errors import StorageError

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(StorageError, match="not a regular file"):
        atomic_write_text(fifo, "data")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["pipe"]


def test_atomic_write_through_a_symlink_writes_its_target(tmp_path):
    """A link (output kept on another file system, linked into the run folder) stays a link: the
    rename used to replace the link by a plain file and leave its target stale."""
    real = tmp_path / "store" / "data.txt"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "data.txt"
    link.symlink_to(real)
    atomic_write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"


def test_atomic_write_of_a_long_legal_name_and_a_too_long_one(tmp_path):
    """A final name near the file system's limit (240 of 255 bytes) is legal, but its temporary
    name (.NAME.HOST.PID.RANDOM.tmp) was not: the write ended in an OSError 'File name too long'
    naming the temporary file (sweep 20: convert -o, a traceback).  A name beyond the limit is one
    StorageError naming it."""
    from distmlip.errors import StorageError

    long = tmp_path / ("a" * 240 + ".txt")
    atomic_write_text(long, "data")
    assert long.read_text() == "data" and [x.name for x in tmp_path.iterdir()] == [long.name]
    too_long = tmp_path / ("b" * 260 + ".txt")
    with pytest.raises(StorageError, match="shorter name"):
        atomic_write_text(too_long, "data")
    assert [x.name for x in tmp_path.iterdir()] == [long.name]


def test_write_probe_of_a_full_disk_is_removed(tmp_path, monkeypatch):
    """check_writable's probe on a full disk (the file is created, its byte does not fit) stayed
    in the output folder as .write-probe.HOST.PID.RANDOM.tmp (sweep 20, on a 200 KiB tmpfs)."""
    import builtins
    import errno

    from distmlip.errors import StorageError
    from distmlip.utils.io import check_writable

    real_open = builtins.open

    class _Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r", *a, **k):
        fh = real_open(path, mode, *a, **k)
        return _Full(fh) if "write-probe" in str(path) else fh

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(StorageError, match="no space left"):
        check_writable(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_extension_loads_with_every_cpu_operator():
    """The build under test has the compiled kernels the CPU plan runs (a build that silently
    lacked them would leave the suite testing the reference paths only)."""
    from distmlip._ext import has_kernel, load_extension

    assert load_extension(), "compiled extension distmlip._C did not load"
    for op in ("chebyshev_forward", "chebyshev_forward_moments", "chebyshev_backward", "chebyshev_double_backward",
               "bpnn_nets_forward", "bpnn_nets_backward", "bpnn_energy_forces", "bpnn_energy_forces_backward",
               "energy_force_loss"):
        assert has_kernel(op, "cpu"), op


def test_cli_help_lists_subcommands():
    out = distmlip_cli(["--help"]).stdout
    for cmd in ("convert", "info", "augment", "train", "evaluate", "export"):
        assert cmd in out


def test_config_reference_is_current():
    """docs/config_reference.md is what tools/gen_config_reference.py makes of the dataclasses."""
    import importlib.util

    from helpers import REPO

    spec = importlib.util.spec_from_file_location("gen_config_reference", REPO / "tools" / "gen_config_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.OUT.read_text() == gen.render(), "run: python tools/gen_config_reference.py"


def test_one_process_commands_run_once_under_mpirun(tmp_path):
    """A command without MPI work sharing (info, evaluate, gpr, md-check, ...) launched with
    mpirun runs on rank 0 only and says so, instead of every rank repeating it."""
    from distmlip.data.examples import emt_structures
    from distmlip.data.h5store import write_dataset
    from helpers import mpirun

    write_dataset(tmp_path / "d.h5", emt_structures(4, seed=1, max_size=2))
    res = mpirun(2, ["-m", "distmlip", "info", str(tmp_path / "d.h5")])
    assert res.stdout.count("structures    :") == 1, res.stdout
    assert "runs in one process; rank 1 of this mpirun has nothing to do" in res.stderr


def test_damaged_model_and_checkpoint_files_are_refused(tmp_path):
    """torch.load does not check the zip records' CRC-32: a flipped bit in a weight loaded
    silently.  load_torch_file checks them and names the file and the record."""
    import torch

    from distmlip.errors import DataFormatError
    from distmlip.utils.io import load_torch_file

    torch.save({"w": torch.arange(2000, dtype=torch.float64)}, tmp_path / "m.pt")
    assert load_torch_file(tmp_path / "m.pt", "model file")["w"].sum() == sum(range(2000))
    b = bytearray((tmp_path / "m.pt").read_bytes())
    import zipfile
    with zipfile.ZipFile(tmp_path / "m.pt") as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    b[info.header_offset + 30 + len(info.filename) + len(info.extra) + 800] ^= 4     # inside the tensor bytes
    (tmp_path / "m.pt").write_bytes(bytes(b))
    with pytest.raises(DataFormatError, match=r"m\.pt: model file is damaged: record .*data/0 fails its checksum"):
        load_torch_file(tmp_path / "m.pt", "model file")


def test_a_file_lock_in_a_read_only_folder_names_the_folder_as_a_folder(tmp_path):
    """convert -o ro/x.h5 into a read-only folder said 'cannot write to the output file ro',
    naming a folder as the file (sweep 20)."""
    from distmlip.errors import StorageError
    from distmlip.utils.io import OutputLock
    from helpers import read_only_folder

    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only_folder(ro):
        with pytest.raises(StorageError, match=f"cannot write to the folder of the output file {ro}"):
            OutputLock(ro, what="output file", file="x.h5").acquire()
        with pytest.raises(StorageError, match=f"cannot write to the output folder {ro}"):
            OutputLock(ro).acquire()
