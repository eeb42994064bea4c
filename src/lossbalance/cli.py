"""The ``lossbalance`` command: thin, it parses flags and calls the experiments."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .experiments.runner import METHODS


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


# ---------------------------------------------------------------------- studies on the runner
def study_options(*, methods: str, alpha: float, alphas: str, seeds: int = 3,
                  grid_help: str = "the study's") -> Callable[[Callable], Callable]:
    """The flags every study command on ``experiments.runner`` shares; the command receives
    them as keyword arguments and hands them to :func:`run_study_command`."""
    opts = [
        click.option("--out", required=True, type=click.Path(path_type=Path),
                     help="Folder for metrics.csv, summary.json/.md and the plots."),
        click.option("--force", is_flag=True, help="Replace the contents of a non-empty --out."),
        click.option("--methods", default=methods, show_default=True,
                     help="Comma-separated: " + ", ".join(METHODS) + "."),
        click.option("--seeds", default=seeds, show_default=True, type=int,
                     help="Runs per method."),
        click.option("--alpha", default=alpha, show_default=True, type=float,
                     help="GradNorm's alpha for the method comparison."),
        click.option("--alphas", default=alphas, show_default=True,
                     help="GradNorm alpha sweep (comma-separated; empty for none)."),
        click.option("--weight-lr", default=0.025, show_default=True, type=float,
                     help="GradNorm weights' (Adam) lr."),
        click.option("--dtp-gamma", default=1.0, show_default=True, type=float,
                     help="DTP's focusing exponent gamma."),
        click.option("--grid-range", default=None, metavar="LO,HI",
                     help="grid: the range of each log10(w_0/w_i) [default: " + grid_help
                     + "]."),
        click.option("--grid-levels", default=None, type=int,
                     help="grid: values per log ratio, evenly spaced over --grid-range "
                     "[default: " + grid_help + "]."),
        click.option("--grid-max-points", default=None, type=int,
                     help="grid: at most this many points; T > 2 subsamples the lattice "
                     "(equal weights and a seeded uniform sample), T = 2 refuses "
                     "[default: " + grid_help + "]."),
        click.option("--workers", default=None, type=int,
                     help="Worker processes for the runs (1: in this process; the results "
                     "are the same for any value) [default: one per available CPU]."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]

    def decorate(f: Callable) -> Callable:
        for opt in reversed(opts):
            f = opt(f)
        return f

    return decorate


def run_study_command(make_study: Callable[[], Any], flags: dict[str, Any]) -> None:
    """Build the study and the runner's options from the shared flags, refuse bad ones
    (one line, nothing written), train, write ``--out`` and say what was written."""
    from .experiments import runner

    grid_range = flags["grid_range"]
    try:
        study = make_study()
        options = runner.Options(
            methods=_names(flags["methods"]), seeds=flags["seeds"], alpha=flags["alpha"],
            alphas=_floats(flags["alphas"], "--alphas"), weight_lr=flags["weight_lr"],
            dtp_gamma=flags["dtp_gamma"],
            grid_range=None if grid_range is None else _floats(grid_range, "--grid-range"),
            grid_levels=flags["grid_levels"], grid_max_points=flags["grid_max_points"],
            workers=flags["workers"],
        ).resolved(study)
        runner.check_out(flags["out"], flags["force"])
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    out = flags["out"]
    _, seconds = runner.run_to_folder(study, options, out, force=flags["force"],
                                      quiet=flags["quiet"])
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    click.echo(f"{study.name} study done in {seconds:.0f} s: wrote {files} to {out}")


@cli.command()
@study_options(methods="equal,gradnorm,uncertainty,static,dtp", alpha=0.12,
               alphas="0,0.12,0.5,1,1.5,2,3",
               grid_help="-1,8 with 19 levels for 2 tasks; 0,4 with 3 levels and 10 points "
               "beyond")
@click.option("--tasks", default=2, show_default=True, type=int,
              help="Number of tasks T: sigma = (1, 100) for 2, log-spaced over [1, 100] beyond.")
@click.option("--steps", default=2000, show_default=True, type=int, help="Training steps a run.")
@click.option("--batch-size", default=100, show_default=True, type=int)
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Model (Adam) lr.")
@click.option("--log-every", default=10, show_default=True, type=int,
              help="Steps between rows of metrics.csv.")
@click.option("--eval-every", default=100, show_default=True, type=int,
              help="Steps between test-set evaluations.")
def toy(tasks: int, steps: int, batch_size: int, lr: float, log_every: int, eval_every: int,
        **flags: Any) -> None:
    """The GradNorm paper's synthetic study (Section 4): train, tabulate, plot."""
    from .experiments.toy import ToyStudy

    run_study_command(lambda: ToyStudy(tasks=tasks, steps=steps, batch_size=batch_size, lr=lr,
                                       log_every=log_every, eval_every=eval_every), flags)


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
              help="Comma-separated: single, equal, gradnorm, gradnorm-log (GradNorm on log "
                   "w), uncertainty, dtp, static.")
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
              help="GradNorm's alpha (1.5: the paper's NYUv2 setting; gradnorm-log too).")
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


@cli.command()
@study_options(methods="single,equal,gradnorm,gradnorm-log,uncertainty,dtp,static,grid",
               alpha=1.5, alphas="0,0.5,1,1.5,2,3",
               grid_help="-1.5,1.5 with 3 levels, 27 points")
@click.option("--epochs", default=20, show_default=True, type=int,
              help="Passes over the training pairs; validation after each (model selection).")
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--lr", default=1e-2, show_default=True, type=float, help="Model (Adam) lr.")
@click.option("--train-pairs", default=8000, show_default=True, type=int,
              help="Pairs drawn from the training split's source images.")
@click.option("--val-pairs", default=2000, show_default=True, type=int)
@click.option("--test-pairs", default=2000, show_default=True, type=int)
@click.option("--data-seed", default=0, show_default=True, type=int,
              help="Seed of the source split and of the pairs (the same for every run).")
@click.option("--log-every", default=10, show_default=True, type=int,
              help="Steps between rows of metrics.csv.")
def digits(epochs: int, batch_size: int, lr: float, train_pairs: int, val_pairs: int,
           test_pairs: int, data_seed: int, log_every: int, **flags: Any) -> None:
    """Pairs of scikit-learn's 8x8 digits: two classifications and two regressions of
    different scales on one trunk; delta_m% against one network per task."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise click.UsageError(
            "the digits study needs scikit-learn: pip install 'lossbalance[digits]'") from None
    from .experiments.digits import DigitsStudy

    run_study_command(lambda: DigitsStudy(
        epochs=epochs, batch_size=batch_size, lr=lr, train_pairs=train_pairs,
        val_pairs=val_pairs, test_pairs=test_pairs, data_seed=data_seed, log_every=log_every,
    ), flags)


@cli.command()
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder of a finished study (the --out of lossbalance toy, digits or "
                   "nyuv2): its summary.json, and metrics.csv where present.")
def report(out: Path) -> None:
    """Write summary.md and the figures of a finished study again from its files, without
    training (summary.json is read, not changed; without metrics.csv the weight and
    loss-ratio figures are left as they are)."""
    from .experiments import report as rep

    try:
        written = rep.render(out)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    files = ", ".join(p.name for p in written)
    click.echo(f"wrote {files} to {out}")


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
