"""Where a training run lives until its bundle is complete: the run folder ``OUT.partial`` beside ``OUT``.

A run writes its settings, log, previews and checkpoints into ``OUT.partial`` (marked as scenetok's own by
the file ``.scenetok-run``), writes the bundle there at the end, and only then swaps it in place of ``OUT``
(:func:`scenetok.io.swap_dir`). So ``OUT`` is always either the old bundle or the new, complete one: a
crash, a full disk, Ctrl-C or SIGKILL never costs the old bundle, and ``--resume`` finds the checkpoint in
``OUT.partial``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from scenetok.bundle import RUN_CONFIG, check_output_dir
from scenetok.errors import BundleError, ConfigError
from scenetok.io import atomic_write_text, swap_dir
from scenetok.training.checkpoint import CHECKPOINT_DIR, has_checkpoint

RUN_SUFFIX = ".partial"
RUN_MARKER = ".scenetok-run"


def run_dir(out_dir: str | Path) -> Path:
    """The run folder of the bundle ``out_dir``: ``<out_dir>.partial`` beside it."""
    out = Path(out_dir)
    return out.parent / f"{out.name}{RUN_SUFFIX}"


def is_run_dir(path: Path) -> bool:
    return (path / RUN_MARKER).is_file()


def checkpoint_step(run: Path) -> int | None:
    """The global step of the checkpoint in the run folder ``run``, or None."""
    if not has_checkpoint(run):
        return None
    try:
        return int(json.loads((run / CHECKPOINT_DIR / "state.json").read_text())["progress"]["global"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def start_run(out_dir: Path, method: str, cfg: dict, *, overwrite: bool, inputs=()) -> Path:
    """A fresh run folder for a new run that will write the bundle ``out_dir``; refuse with a clear error
    when ``out_dir`` may not be replaced, or when an unfinished run with a checkpoint would be lost."""
    check_output_dir(out_dir, overwrite=overwrite, inputs=inputs)
    run = run_dir(out_dir)
    if run.exists() or run.is_symlink():
        if not run.is_dir() or not is_run_dir(run):
            raise BundleError(f"{run} exists and was not made by scenetok (it is where a run of -o {out_dir} keeps "
                              "its checkpoints)", hint="move it away, or choose another -o folder")
        step = checkpoint_step(run)
        if step is not None and not overwrite:
            raise BundleError(f"an unfinished run of {out_dir} has a checkpoint at step {step} in {run}",
                              hint="continue it with --resume, or pass --overwrite to start again")
        shutil.rmtree(run)  # scenetok's own unfinished run: nothing to resume (or --overwrite)
    run.mkdir(parents=True)
    atomic_write_text(run / RUN_MARKER, json.dumps({"bundle": out_dir.name}) + "\n")
    import torch

    # the CPU thread count is part of the run: float sums split over threads differently give other bits,
    # so --resume uses the same count (see resume_threads)
    atomic_write_text(run / RUN_CONFIG, json.dumps({"method": method, "config": cfg,
                                                    "cpu_threads": torch.get_num_threads()}, indent=2))
    return run


def resume_threads(run: Path) -> int | None:
    """The CPU thread count the run in ``run`` started with (None when not recorded)."""
    try:
        n = json.loads((run / RUN_CONFIG).read_text()).get("cpu_threads")
    except (OSError, ValueError):
        return None
    return int(n) if isinstance(n, int) and n > 0 else None


def resume_run(out_dir: Path, method: str) -> tuple[Path, dict]:
    """The run folder and saved settings of the unfinished run of ``out_dir``; clear errors (with hints that
    lead somewhere) when there is nothing to resume."""
    run = run_dir(out_dir)
    if not run.is_dir() or not is_run_dir(run):
        raise BundleError(f"--resume: there is no unfinished run of {out_dir} (no {run})",
                          hint="start it without --resume")
    if not has_checkpoint(run):
        raise BundleError(f"--resume: the run in {run} stopped before its first checkpoint",
                          hint="start it again without --resume (the same command; that unfinished run is "
                               "replaced)")
    try:
        saved = json.loads((run / RUN_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"--resume: {run / RUN_CONFIG} cannot be read ({e})",
                          hint="start again without --resume and with --overwrite") from None
    if saved.get("method") != method:
        raise ConfigError(f"--resume: {run} is a run of {saved.get('method')}, not {method}",
                          hint=f"resume with --method {saved.get('method')}")
    return run, saved["config"]


def finish_run(run: Path, out_dir: Path) -> None:
    """The run's bundle is complete in ``run``: drop the run-only files and swap it in place of ``out_dir``
    (checked again first: files put into ``out_dir`` during the run are never replaced)."""
    try:
        check_output_dir(out_dir, overwrite=True)
    except BundleError as e:
        raise BundleError(f"{e.message}; the new bundle is complete in {run}", hint=e.hint) from None
    (run / RUN_MARKER).unlink(missing_ok=True)
    shutil.rmtree(run / CHECKPOINT_DIR, ignore_errors=True)
    swap_dir(run, out_dir)
