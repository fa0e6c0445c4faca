"""Committees: K models that differ by seed, trained by groups of ranks in one job.

Member k uses ``training.seed + k`` (initial weights, data order, and the bootstrap resample when
``committee.bootstrap``), so member 0 is the model a plain run with the same seed trains.

Rank groups.  With world size W and K members, G = ``committee.groups`` or, when 0, the largest
divisor of W that is <= K (G = min(K, W) whenever W is a multiple of it; e.g. W = 4, K = 3 gives
G = 2 groups of 2 ranks; W = 3, K = 2 gives G = 1 group of 3).  Group g holds the ranks g, g+G,
g+2G, ... (``ctx.split(G)``, distmlip.distributed) and trains members g, g+G, ... one after the
other, data parallel inside the group: the group's DistContext gives the Trainer the rank and size
in the group and collectives on the group only, so gradients are all-reduced within the group and
groups never wait for each other until the end.

Warm start: ``training.warm_start`` containing ``{k}`` (e.g. ``old/member_{k:02d}/model.pt``)
is formatted per member, so that member k fine-tunes member k of an earlier committee (as
``distmlip explore`` does); without it every member starts from the same file.

Output: ``OUTPUT/member_XX/`` (log.csv, checkpoint.pt, model.pt, ... of member XX, written by the
group's first rank), ``OUTPUT/committee.pt`` (all members' model payloads: ``load_models``) and
``OUTPUT/committee.json`` (seeds, groups, status).  Resume (``--resume auto`` or ``--resume
OUTPUT``): members marked done are kept, a member with ``checkpoint.pt`` continues from it (bit for
bit), the others start afresh.  SIGTERM/SIGUSR1 stop a group at its next step boundary (the
check is collective within the group only); the committee file is then not written and the job
exits 0 saying how to resume.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from ..distributed.liveness import Heartbeat
from ..utils.io import atomic_write_text, load_torch_file
from ..utils.log import log


def n_groups(K: int, world_size: int, requested: int = 0) -> int:
    if requested:
        if world_size % requested != 0 or requested > K:
            from ..errors import ConfigError

            raise ConfigError(f"committee.groups: {requested} must divide the number of ranks ({world_size}) "
                              f"and not exceed K ({K})")
        return requested
    return max(g for g in range(1, min(K, world_size) + 1) if world_size % g == 0)


def member_seed(cfg, k: int) -> int:
    return int(cfg.training.seed) + int(k)


def member_dir(out, k: int) -> Path:
    return Path(out) / f"member_{k:02d}"


def _member_cfg(cfg, k: int, out: Path):
    c = copy.deepcopy(cfg)
    c.training.seed = member_seed(cfg, k)
    c.training.output = str(member_dir(out, k))
    ws = c.training.warm_start
    if ws and "{k" in ws:     # 'prev/member_{k:02d}/model.pt': member k continues member k (explore)
        c.training.warm_start = ws.format(k=k)
    return c


def _done_info(k_dir: Path):
    p = k_dir / "done.json"
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except ValueError:
            return None
    return None


def train_committee(cfg, ctx, resume: bool = False, quiet: bool = False, step_callback=None,
                    force: bool = False, resume_hint: str | None = None) -> str:
    """Train the K members of ``cfg.committee`` over the ranks of ``ctx``; returns 'done' or
    'stopped'.  ``step_callback(trainer, k)`` (tests): True requests a stop like a signal."""
    from ..models.bpnn import save_committee
    from .trainer import Trainer

    K = int(cfg.committee.K)
    out = Path(cfg.training.output)
    G = n_groups(K, ctx.world_size, cfg.committee.groups)
    g, gctx = ctx.split(G)
    if ctx.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            from .trainer import keep_earlier_run

            keep_earlier_run(out, quiet=quiet, members_from=K)
        import yaml

        from ..config import absolute_paths, config_to_dict

        atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(absolute_paths(cfg)), sort_keys=False))
    if not quiet:
        log(f"committee: K = {K} members on {ctx.world_size} rank(s) in {G} group(s) of "
            f"{ctx.world_size // G} rank(s); seeds {member_seed(cfg, 0)}..{member_seed(cfg, K - 1)}"
            + (", bootstrap" if cfg.committee.bootstrap else ""))
    _shared_cache(cfg, ctx, quiet)
    ctx.barrier()
    # groups finish at different times (hours apart), so the wait below has no deadline; a rank
    # whose heartbeat stops (frozen, its node lost) ends it instead, and a waiting rank sleeps
    # rather than spinning a core that another group's ranks may share
    with Heartbeat(out, ctx.rank, ctx.world_size, ctx.timeout_s,
                   hint="finished members are kept: rerun with --resume auto") as hb:
        status = "done"
        my_members = list(range(g, K, G))
        statuses = {}
        for k in my_members:
            kd = member_dir(out, k)
            mcfg = _member_cfg(cfg, k, out)
            info = _done_info(kd) if resume else None
            if info is not None and (info.get("status") in ("early_stopped", "max_steps", "converged")
                                     or info.get("epochs", 0) >= cfg.training.epochs):
                statuses[k] = info.get("status", "done")
                continue
            ck = kd / "checkpoint.pt"
            res = str(ck) if resume and ck.is_file() else None
            prefix = f"[member {k:02d}] " if K > 1 else ""
            tr = Trainer(mcfg, gctx, resume=res, quiet=quiet, log_prefix=prefix, force=force, resume_hint=resume_hint)
            cb = None if step_callback is None else (lambda t, k=k: step_callback(t, k))
            st = tr.fit(step_callback=cb)
            statuses[k] = st
            if st == "stopped":
                status = "stopped"
                break
            if gctx.rank == 0:
                atomic_write_text(kd / "done.json", json.dumps({"status": st, "epochs": tr.epoch,
                                                                "seed": mcfg.training.seed}))
        ctx.barrier(sleep=True, watch=hb.check)
    # all groups are here
    everything = ctx.all_gather_object({"rank": ctx.rank, "status": status, "members": statuses})
    stopped = any(e["status"] == "stopped" for e in everything)
    if ctx.rank == 0:
        allst = {}
        for e in everything:
            allst.update({int(k): v for k, v in e["members"].items()})
        meta = {"K": K, "groups": G, "world_size": ctx.world_size, "bootstrap": bool(cfg.committee.bootstrap),
                "seeds": [member_seed(cfg, k) for k in range(K)],
                "status": {f"member_{k:02d}": allst.get(k, "not started") for k in range(K)}}
        if not stopped:
            payloads = []
            for k in range(K):
                obj = load_torch_file(member_dir(out, k) / "model.pt", "model file")
                payloads.append(obj)
            save_committee(out / "committee.pt", payloads, metadata=meta)
            if not quiet:
                log(f"committee of {K} written to {out / 'committee.pt'}")
        else:
            if not quiet:
                log(f"stop requested: committee incomplete ({meta['status']}); resume with "
                    f"{resume_hint or repr('distmlip train CONFIG --resume auto')}")
        atomic_write_text(out / "committee.json", json.dumps(meta, indent=2))
    ctx.barrier()
    return "stopped" if stopped else status


def _shared_cache(cfg, ctx, quiet):
    """Build/validate the descriptor cache once with ALL ranks before the groups start (so that
    groups do not race on the file)."""
    dc = cfg.descriptor
    if getattr(dc, "cache", "off") == "off" or cfg.training.mode != "energy":
        return
    from ..data.h5store import H5Dataset
    from ..descriptors.featurize import open_or_build
    from ..utils.log import warn

    from ..descriptors.spec import choose_kernels

    ds = H5Dataset(cfg.data.train)
    species = cfg.model.species or list(ds.species)
    kernels = choose_kernels(ctx.device, dc.backend)
    c = open_or_build(ds, species, dc.spec, kernels, dc.cache_file, dc.cache, ctx, log_fn=None if quiet else log,
                      warn_fn=warn)
    if c is not None:
        c.close()
    if cfg.data.validation:
        vds = H5Dataset(cfg.data.validation)
        vpath = None if not dc.cache_file else str(dc.cache_file) + ".val.h5"
        c = open_or_build(vds, species, dc.spec, kernels, vpath, dc.cache, ctx, log_fn=None if quiet else log,
                          warn_fn=warn)
        if c is not None:
            c.close()


__all__ = ["n_groups", "train_committee", "member_seed", "member_dir"]
