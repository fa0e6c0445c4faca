"""`distmlip ...` (the real CLI, distmlip.cli.main) with a test-only fault injector around
Trainer.train_step, read from the environment:

  DISTMLIP_TEST_SIGNAL=RANK:STEP[:SIG]   that rank sends itself SIG (default SIGTERM) just
                                         before global step STEP (counted from 0 in this process)
  DISTMLIP_TEST_RAISE=RANK:STEP          that rank raises RuntimeError in global step STEP
  DISTMLIP_TEST_PIDDIR=DIR               each rank writes DIR/pid.<rank> at its first step
  DISTMLIP_TEST_SLEEP=SECONDS            sleep after every step (to give an outside signal time)
  DISTMLIP_TEST_FREEZE=RANK[:STAGE]      that rank writes DISTMLIP_TEST_PIDDIR/pid.<rank> and stops
                                         itself (SIGSTOP) before its first augment subset (STAGE
                                         augment, the default), descriptor block (featurize) or
                                         share of the frames (convert) or training step (train)
"""
import os
import signal
import sys
import time

from distmlip import cli
from distmlip.data import convert as convert_mod
from distmlip.descriptors import featurize as featurize_mod
from distmlip.gpr import augment as augment_mod
from distmlip.training import trainer as trainer_mod


def _spec(name):
    v = os.environ.get(name)
    if not v:
        return None
    parts = v.split(":")
    return int(parts[0]), int(parts[1]), (parts[2] if len(parts) > 2 else "SIGTERM")


_orig = trainer_mod.Trainer.train_step
_count = {"n": 0}


def train_step(self, structures, acc):
    rank, n = self.ctx.rank, _count["n"]
    if n == 0:
        from distmlip.distributed import get_context

        _freeze(get_context().rank, "train")      # the job's rank (a committee group's rank is not)
    piddir = os.environ.get("DISTMLIP_TEST_PIDDIR")
    if piddir and n == 0:
        with open(os.path.join(piddir, f"pid.{rank}.tmp"), "w") as f:
            f.write(str(os.getpid()))
        os.replace(os.path.join(piddir, f"pid.{rank}.tmp"), os.path.join(piddir, f"pid.{rank}"))
    sig = _spec("DISTMLIP_TEST_SIGNAL")
    if sig and sig[0] == rank and sig[1] == n:
        os.kill(os.getpid(), getattr(signal, sig[2]))
    bad = _spec("DISTMLIP_TEST_RAISE")
    if bad and bad[0] == rank and bad[1] == n:
        raise RuntimeError(f"injected failure in step {n} on rank {rank}")
    _count["n"] += 1
    out = _orig(self, structures, acc)
    if os.environ.get("DISTMLIP_TEST_SLEEP"):
        time.sleep(float(os.environ["DISTMLIP_TEST_SLEEP"]))
    return out


trainer_mod.Trainer.train_step = train_step
_orig_subsets = augment_mod.process_subsets


def _freeze(rank, stage):
    v = os.environ.get("DISTMLIP_TEST_FREEZE", "")
    if v and v.split(":")[0] == str(rank) and (v.split(":") + ["augment"])[1] == stage:
        piddir = os.environ["DISTMLIP_TEST_PIDDIR"]
        with open(os.path.join(piddir, f"pid.{rank}"), "w") as f:
            f.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)


def process_subsets(ds, sids, cfg, rank=0, shared=None):
    _freeze(rank, "augment")
    return _orig_subsets(ds, sids, cfg, rank, shared)


augment_mod.process_subsets = process_subsets
_orig_features = featurize_mod.compute_features


def compute_features(*args, **kwargs):
    from distmlip.distributed import get_context

    _freeze(get_context().rank, "featurize")
    return _orig_features(*args, **kwargs)


featurize_mod.compute_features = compute_features
_orig_frames = convert_mod._process_frames


def _process_frames(*args, **kwargs):
    from distmlip.distributed import get_context

    _freeze(get_context().rank, "convert")
    return _orig_frames(*args, **kwargs)


convert_mod._process_frames = _process_frames

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
