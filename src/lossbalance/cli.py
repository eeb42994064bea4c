"""The ``lossbalance`` command: thin, it parses flags and calls the experiments."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import click


def _floats(text: str, name: str) -> tuple[float, ...]:
    if text.strip() == "":
        return ()
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers",
                                 param_hint=name) from None


def _names(text: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in text.split(","))
    if any(v == "" for v in items):
        raise click.BadParameter(f"{text!r} has an empty entry", param_hint="--methods")
    return items


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lossbalance")
def cli() -> None:
    """lossbalance: adaptive loss balancing for multi-task networks."""


@cli.command()
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for metrics.csv, summary.json/.md and the plots.")
@click.option("--force", is_flag=True, help="Replace the contents of a non-empty --out.")
@click.option("--tasks", default=2, show_default=True, type=int,
              help="Number of tasks T: sigma = (1, 100) for 2, log-spaced over [1, 100] beyond.")
@click.option("--methods", default="equal,gradnorm,uncertainty,static,dtp", show_default=True,
              help="Comma-separated: equal, gradnorm, uncertainty, static, dtp.")
@click.option("--seeds", default=3, show_default=True, type=int, help="Runs per method.")
@click.option("--steps", default=2000, show_default=True, type=int, help="Training steps a run.")
@click.option("--alpha", default=0.12, show_default=True, type=float,
              help="GradNorm's alpha for the method comparison.")
@click.option("--alphas", default="0,0.12,0.5,1,1.5,2,3", show_default=True,
              help="GradNorm alpha sweep (comma-separated; empty for none).")
@click.option("--batch-size", default=100, show_default=True, type=int)
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Model (Adam) lr.")
@click.option("--weight-lr", default=0.025, show_default=True, type=float,
              help="GradNorm weights' (Adam) lr.")
@click.option("--log-every", default=10, show_default=True, type=int,
              help="Steps between rows of metrics.csv.")
@click.option("--eval-every", default=100, show_default=True, type=int,
              help="Steps between test-set evaluations.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def toy(out: Path, force: bool, tasks: int, methods: str, seeds: int, steps: int, alpha: float,
        alphas: str, batch_size: int, lr: float, weight_lr: float, log_every: int,
        eval_every: int, quiet: bool) -> None:
    """The GradNorm paper's synthetic study (Section 4): train, tabulate, plot."""
    from .experiments import report
    from .experiments import toy as study

    try:
        cfg = study.ToyConfig(
            tasks=tasks, methods=_names(methods), seeds=seeds, steps=steps, alpha=alpha,
            alphas=_floats(alphas, "--alphas"), batch_size=batch_size, lr=lr,
            weight_lr=weight_lr, log_every=log_every, eval_every=eval_every,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if out.exists() and not out.is_dir():
        raise click.UsageError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise click.UsageError(f"--out {out} is not empty (pass --force to replace it)")

    from tqdm import tqdm

    from . import plots

    total = len(study.plan_runs(cfg)) * cfg.steps
    started = time.perf_counter()
    with tqdm(total=total, disable=quiet, unit="step", desc="toy study", file=sys.stderr,
              mininterval=1.0) as bar:
        rows, summaries = study.run_study(cfg, on_step=lambda: bar.update(1))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        staging = Path(tmp)
        report.write_metrics(rows, staging / "metrics.csv")
        summary = report.summarize(summaries, study.config_dict(cfg))
        report.write_summary(summary, staging / ".")
        plots.plot_study(staging)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staging, out)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    click.echo(f"toy study done in {time.perf_counter() - started:.0f} s: wrote {files} to {out}")


@cli.command()
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="NYUv2 root with train/ and val/ in MTAN's .npy layout (docs/nyuv2.md).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for metrics.csv, summary.json/.md, config.json and checkpoints/.")
@click.option("--force", is_flag=True, help="Replace the contents of a non-empty --out.")
@click.option("--resume", is_flag=True,
              help="Continue the study in --out from its checkpoints (same settings; "
                   "--epochs may grow).")
@click.option("--methods", default="single,equal,gradnorm,uncertainty,dtp,static",
              show_default=True,
              help="Comma-separated: single, equal, gradnorm, uncertainty, dtp, static.")
@click.option("--seeds", default=1, show_default=True, type=int, help="Runs per method.")
@click.option("--epochs", default=200, show_default=True, type=int)
@click.option("--batch-size", default=2, show_default=True, type=int)
@click.option("--lr", default=1e-4, show_default=True, type=float, help="Model (Adam) lr.")
@click.option("--lr-step", default=100, show_default=True, type=int,
              help="Epochs between lr halvings (StepLR).")
@click.option("--width", default=64, show_default=True, type=int,
              help="SegNet base width (64: the literature's 25 M parameters).")
@click.option("--limit", default=None, type=int,
              help="Use only the first N train and N val samples (a quick run).")
@click.option("--alpha", default=1.5, show_default=True, type=float,
              help="GradNorm's alpha (1.5: the paper's NYUv2 setting).")
@click.option("--weight-lr", default=0.025, show_default=True, type=float,
              help="GradNorm weights' (Adam) lr.")
@click.option("--gradnorm-at", type=click.Choice(["weight", "h"]), default="weight",
              show_default=True,
              help="Where GradNorm measures: the last shared conv's weight, or the shared "
                   "feature map h.")
@click.option("--dtp-gamma", default=1.0, show_default=True, type=float)
@click.option("--static-weights", default=None,
              help="w for static (segmentation,depth,normal), e.g. a GradNorm run's final "
                   "weights; default: those of this study's GradNorm run of the same seed.")
@click.option("--baseline", default=None, type=click.Path(path_type=Path),
              help="summary.json of an earlier study with single, for delta_m.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Default: cuda when available, else cpu.")
@click.option("--amp", type=click.Choice(["none", "bf16", "fp16"]), default="none",
              show_default=True, help="Autocast dtype (fp16 adds a GradScaler).")
@click.option("--workers", default=2, show_default=True, type=int,
              help="DataLoader worker processes.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def nyuv2(data: Path, out: Path, force: bool, resume: bool, methods: str, seeds: int,
          epochs: int, batch_size: int, lr: float, lr_step: int, width: int, limit: int | None,
          alpha: float, weight_lr: float, gradnorm_at: str, dtp_gamma: float,
          static_weights: str | None, baseline: Path | None, device: str | None, amp: str,
          workers: int, quiet: bool) -> None:
    """NYUv2 segmentation, depth and normals with every balancer (the paper's benchmark)."""
    import torch

    from .experiments import nyuv2 as study

    try:
        cfg = study.NYUv2Config(
            data=str(data), methods=_names(methods), seeds=seeds, epochs=epochs,
            batch_size=batch_size, lr=lr, lr_step=lr_step, width=width, limit=limit,
            alpha=alpha, weight_lr=weight_lr, gradnorm_at=gradnorm_at, dtp_gamma=dtp_gamma,
            static_weights=None if static_weights is None
            else _floats(static_weights, "--static-weights"),
            device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
            amp=amp, workers=workers,
        )
        layout, base = study.prepare_out(cfg, out, force=force, resume=resume,
                                         baseline_path=baseline)
    except ValueError as exc:  # refused before anything is written
        raise click.UsageError(str(exc)) from None
    try:
        line = study.run_prepared(cfg, out, layout, base, baseline, quiet=quiet)
    except ValueError as exc:  # e.g. a label file with a class out of range
        raise click.ClickException(str(exc)) from None
    click.echo(line)


def main(argv: list[str] | None = None) -> int:
    """Entry point; a bad flag gives one line on stderr and exit status 2."""
    try:
        cli.main(args=argv, prog_name="lossbalance", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"lossbalance: error: {exc.format_message()}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("lossbalance: aborted", err=True)
        return 1
    return 0


def entry() -> None:
    """Console-script wrapper: exit with :func:`main`'s status."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
