"""Write examples/toy_demo.ipynb and execute it, so the committed notebook carries its outputs.

The cells are kept here as text (reviewed like code); the notebook is generated from them::

    .venv/bin/python examples/make_notebook.py               # write and execute (default steps)
    .venv/bin/python examples/make_notebook.py --no-execute  # write the cells only

``LOSSBALANCE_DEMO_STEPS`` (training steps per run, default ``DEFAULT_STEPS``) and
``LOSSBALANCE_DEMO_OUT`` (the study runner's folder, default ``runs/toy_demo`` beside the
notebook) reach the notebook's kernel through the environment. Regenerate the committed file
with neither set. Figures are PNGs at 70 dpi, so that the file stays small.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nbformat
from nbformat import NotebookNode
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOK = Path(__file__).with_name("toy_demo.ipynb")
DEFAULT_STEPS = 2000
SEEDS = 2
#: Tag of the code cells that must show a figure (tests/test_notebook.py checks the outputs).
FIGURE = "figure"
#: Tag of the code cells that print a section's table.
TABLE = "table"

INTRO = f"""\
# GradNorm on the paper's toy problem

How to use `lossbalance` on the synthetic problem of the GradNorm paper (Chen, Badrinarayanan,
Lee, Rabinovich, *GradNorm*, ICML 2018, Section 4), and what the library's study runner
measures on it:

1. the problem;
2. one training loop, run with GradNorm, equal weights and Uncertainty Weighting: the weights
   and the loss ratios over training;
3. GradNorm's test loss against its one hyperparameter, alpha;
4. GradNorm's final weights, held fixed and retrained from scratch, against a grid of static
   weights.

`examples/make_notebook.py` writes and executes this notebook. `LOSSBALANCE_DEMO_STEPS` sets the
training steps of every run (default {DEFAULT_STEPS}, as `lossbalance toy`); the test suite runs
it with a few. Sections 3 and 4 train {SEEDS} seeds per setting and fewer settings than the full
study (`lossbalance toy`, 3 seeds), to keep the notebook short to run."""

SETUP = f"""\
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Image, display
from torch.nn import functional as F

import lossbalance as lb
from lossbalance.experiments import runner, toy

STEPS = int(os.environ.get("LOSSBALANCE_DEMO_STEPS", "{DEFAULT_STEPS}"))  # optimizer steps a run
SEEDS = {SEEDS}  # seeds per setting in sections 3 and 4
OUT = Path(os.environ.get("LOSSBALANCE_DEMO_OUT", "runs/toy_demo"))  # the study runner's files
torch.set_num_threads(1)  # one thread a run, as the study runner trains


def show(path):
    \"\"\"Display a PNG figure.\"\"\"
    display(Image(filename=str(path)))


print(f"training steps per run: {{STEPS}}; seeds per setting in sections 3 and 4: {{SEEDS}}")"""

PROBLEM_MD = r"""## 1. The problem

$T = 2$ regression tasks share one input $x \in \mathbb{R}^{250}$ (entries uniform on
$[0, 1]$) and predict

$$f_i(x) = \sigma_i \tanh\big((B + \epsilon_i)\, x\big) \in \mathbb{R}^{100}, \qquad
\sigma = (1, 100),$$

with $B$ ($100 \times 250$, entries $N(0, 10^2)$) drawn once and shared by the tasks, and
$\epsilon_i$ (entries $N(0, 3.5^2)$) drawn once per task. The tasks differ mainly in scale, so
the plain sum of their mean squared errors is ruled by task 1. The model is the paper's: a
250 → 4 × 100 ReLU trunk and one 100 → 100 linear head per task. Methods are compared on the
normalised test loss $\sum_i \mathrm{MSE}_i / \sigma_i^2$ (lower is better), in which both tasks
count."""

PROBLEM = """\
study = toy.ToyStudy(tasks=2, steps=STEPS)  # the paper's setting: sigma = (1, 100)
data = study.make_data()  # B, eps_i and the inputs, drawn from a fixed seed
print(f"inputs: {tuple(data.x_train.shape)} train, {tuple(data.x_test.shape)} test")
for i, (sigma, y) in enumerate(zip(data.sigmas, data.y_train, strict=True)):
    print(f"task {i}: sigma = {sigma:g}, targets {tuple(y.shape)}, "
          f"mean square target {y.pow(2).mean():.4g}")"""

LOOP_MD = r"""## 2. GradNorm beside equal weights and Uncertainty Weighting

Every balancer has the same interface, so one loop trains with any of them:

- `balancer.tap(h)` gives each head its own alias of the shared representation $h$; GradNorm
  reads each task's gradient there (its fast path), the others return $h$ itself.
- `balancer.backward(losses, shared=W)` leaves in `.grad` the gradient of $\sum_i w_i L_i$ and
  then updates the weights. GradNorm measures $G_i = \lVert \nabla_W\, w_i L_i \rVert$ at $W$, here
  the last shared layer's weight as in the paper, and moves $w$ so that $G_i$ tracks
  $\bar G\, r_i^{\alpha}$, where $r_i$ is task $i$'s loss ratio $L_i(t)/L_i(0)$ over the tasks'
  mean ratio.

The balancers compared:

- `EqualWeighting(2)`: $w_i = 1$.
- `GradNorm(2, alpha=0.12, lr=0.025)`: the paper's update of $w$ (alpha as in `lossbalance toy`).
- `GradNorm(..., log_weights=True)`: the same, but its optimizer steps $\log w$: multiplicative
  steps, so a small weight approaches its value geometrically instead of overshooting onto the
  floor of $10^{-6}$ (not in the paper).
- `UncertaintyWeighting(2)` (Kendall et al., CVPR 2018): the total
  $\sum_i \tfrac12 e^{-s_i} L_i + \tfrac12 s_i$, with the log-variances $s_i$ trained by the
  model's optimizer; its weight is $\tfrac12 e^{-s_i}$.

One seed each; the weights are logged every 10 steps."""

LOOP = """\
def train(balancer, seed=0, log_every=10):
    \"\"\"Train the paper's model with one balancer; returns the model and a log.\"\"\"
    torch.manual_seed(seed)  # the model's initialisation
    model = toy.ToyNet(num_tasks=2)
    # Uncertainty Weighting's log-variances train with the model; GradNorm's weights have
    # their own optimizer inside the balancer; equal weights have no parameters.
    opt = torch.optim.Adam([*model.parameters(), *balancer.parameters()], lr=1e-3)
    log = {"step": [], "weight": [], "loss_ratio": []}
    lowest = torch.full((2,), float("inf"))  # each task's lowest weight over training
    for step, (x, targets) in enumerate(study.batches(data, seed)):  # STEPS batches of 100
        opt.zero_grad()
        h = balancer.tap(model.trunk(x))
        losses = [F.mse_loss(model.heads[i](h[i]), targets[i]) for i in range(2)]
        balancer.backward(losses, shared=model.last_shared)
        opt.step()
        loss, w = torch.stack(losses).detach(), balancer.stats["weight"]  # w: this step's
        lowest = torch.minimum(lowest, w)
        if step == 0:
            first = loss
        if step % log_every == 0 or step == STEPS - 1:
            log["step"].append(step)
            log["weight"].append(w.tolist())
            log["loss_ratio"].append((loss / first).tolist())
    log["steps"], log["lowest"] = step + 1, lowest.tolist()
    return model, log


def test_mse(model):
    \"\"\"Each task's mean squared error on the test set.\"\"\"
    with torch.no_grad():
        h = model.trunk(data.x_test)
        return [F.mse_loss(model.heads[i](h), data.y_test[i]).item() for i in range(2)]


balancers = {
    "equal": lb.EqualWeighting(2),
    "gradnorm": lb.GradNorm(2, alpha=0.12, lr=0.025),
    "gradnorm (log w)": lb.GradNorm(2, alpha=0.12, lr=0.025, log_weights=True),
    "uncertainty": lb.UncertaintyWeighting(2, ["regression", "regression"]),
}
logs, test_mses = {}, {}
print(f"{'method':>16}  steps  test MSE task 0  task 1  Σ MSE_i/σ_i²  final w  lowest w_1")
for name, balancer in balancers.items():
    model, logs[name] = train(balancer)
    mse = test_mses[name] = test_mse(model)
    total = sum(m / s**2 for m, s in zip(mse, data.sigmas, strict=True))
    w = balancer.weights.tolist()
    print(f"{name:>16}  {logs[name]['steps']:5d}  {mse[0]:15.4f}  {mse[1]:6.0f}  "
          f"{total:12.4f}  ({w[0]:.3g}, {w[1]:.3g})  {logs[name]['lowest'][1]:.2g}")"""

LOOP_FIG = """\
fig, axes = plt.subplots(2, len(logs), figsize=(11, 5), sharex=True, sharey="row", dpi=70)
for col, (name, log) in enumerate(logs.items()):
    for row, key in enumerate(("weight", "loss_ratio")):
        ax = axes[row, col]
        for i, sigma in enumerate(data.sigmas):
            ax.plot(log["step"], [v[i] for v in log[key]], label=f"task {i} (σ = {sigma:g})")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0, col].set_title(name)
    axes[1, col].set_xlabel("step")
axes[0, 0].set_ylabel("task weight $w_i$")
axes[1, 0].set_ylabel("$L_i(t) / L_i(0)$")
axes[0, 0].legend(fontsize=8)
fig.tight_layout()
OUT.mkdir(parents=True, exist_ok=True)
fig.savefig(OUT / "balancers.png")
plt.close(fig)
show(OUT / "balancers.png")"""

LOOP_READ = """\
Top: the weights each step used (plotted every 10 steps; the table's last column is task 1's
lowest weight over all steps); bottom: the training loss ratios $L_i(t)/L_i(0)$. GradNorm
lowers the weight of the $\\sigma = 100$ task early in training, until the two tasks' gradient
norms at $W$ follow their targets. With the paper's update, the weights' Adam takes steps of
about `lr` = 0.025 in $w$ itself, large against a weight of a few hundredths: it overshoots and
jitters. With `log_weights=True` the steps are multiplicative and the weight settles smoothly.
Uncertainty Weighting moves slowly: its log-variances take steps of the model's learning rate."""

ALPHA_MD = f"""\
## 3. The alpha sweep

alpha sets how hard GradNorm pushes a task that trains slower than the others ($r_i > 1$);
alpha = 0 asks only for equal gradient norms. The paper reports results insensitive to alpha on
about $(0, 3)$. Here the study runner (`lossbalance.experiments.runner`, the code behind
`lossbalance toy`) trains GradNorm at five values of alpha, with equal weights and Uncertainty
Weighting as references, {SEEDS} seeds each, the same loop as above for every run. It writes
`metrics.csv`, `summary.json`, `summary.md` and its figures to `OUT / "alpha"`."""

ALPHA = """\
options = runner.Options(methods=("equal", "uncertainty", "gradnorm"), seeds=SEEDS,
                         alpha=0.12, alphas=(0.0, 0.12, 0.5, 1.5, 3.0))
sweep, seconds = runner.run_to_folder(study, options, OUT / "alpha", force=True, quiet=True)

KEY = "normalized_test_loss"  # Σ MSE_i / σ_i² on the test set, mean ± std over seeds
print(f"{len(sweep['runs'])} runs in {seconds:.0f} s")
for name in ("equal", "uncertainty"):
    m = sweep["methods"][name][KEY]
    print(f"{name:>13}:  {m['mean']:.4f} ± {m['std']:.2g}")
for alpha, a in sweep["alpha_sweep"].items():
    m, w = a[KEY], [v["mean"] for v in a["final_weights"]]
    print(f"alpha = {float(alpha):4g}:  {m['mean']:.4f} ± {m['std']:.2g}  "
          f"final w = ({w[0]:.3g}, {w[1]:.3g})")
# The runner trains the loop of section 2: its seed-0 runs end where that loop's did.
seed0 = {r["method"]: [r["test"]["loss_0"], r["test"]["loss_1"]] for r in sweep["runs"]
         if r["seed"] == 0 and r["alpha"] in (None, 0.12)}
print("seed 0, test MSE as in section 2:",
      all(seed0[m] == test_mses[m] for m in ("equal", "gradnorm", "uncertainty")))"""

ALPHA_FIG = """show(OUT / "alpha" / "test_loss_vs_alpha.png")"""

GRID_MD = f"""\
## 4. The static retrain and the grid of static weights

The paper's claim: GradNorm's final weights, held fixed and retrained from scratch, land close
to the best weights a grid search finds: one GradNorm run instead of a search. The runner trains,
for each of {SEEDS} seeds:

- `gradnorm` (alpha = 0.12);
- `static`: `lb.StaticWeighting(final GradNorm weights)` of the same seed, from the same
  initialisation and batches;
- `grid`: static weights with $\\log_{{10}}(w_0 / w_1) = -1, 0, 1, \\dots, 8$ ($w_0 + w_1 = 2$;
  `lossbalance toy` takes half-decade steps).

The figure shows the test loss over the grid, with GradNorm's final weights and its static
retrain marked. Distances between weights are in decades of the centred $\\log_{{10}} w$ (for two
tasks, $|\\Delta \\log_{{10}}(w_0/w_1)| / \\sqrt 2$); the gap is a method's mean test loss minus the
best grid point's (positive: worse), also in units of the best point's spread over seeds."""

GRID = """\
options = runner.Options(methods=("gradnorm", "static", "grid"), seeds=SEEDS,
                         alpha=0.12, alphas=(), grid_range=(-1.0, 8.0), grid_levels=10)
result, seconds = runner.run_to_folder(study, options, OUT / "grid", force=True, quiet=True)

grid = result["grid"]
print(f"{len(result['runs'])} runs in {seconds:.0f} s")
for p in grid["points"]:
    m, w = p["metric"], p["weights"]
    print(f"grid log10(w0/w1) = {p['coords'][0]:2g}:  w = ({w[0]:.3g}, {w[1]:.3g})  "
          f"{m['mean']:.4f} ± {m['std']:.2g}")
best = grid["best"]
print(f"best grid point: log10(w0/w1) = {best['coords'][0]:g}"
      + (" (at the edge of the grid)" if best["at_edge"] else ""))
for name, m in grid["methods"].items():
    w, spread = m["mean_weights"], m["gap_over_best_std"]
    print(f"{name:>12}: w = ({w[0]:.3g}, {w[1]:.3g}), {m['metric']['mean']:.4f}, "
          f"{m['distance']['mean']:.2f} decades from the best point, gap {m['gap']:+.4f}"
          + ("" if spread is None else f" = {spread:+.1f} best std")
          + (": within" if m["within_best_std"] else ": outside") + " the best point's spread")"""

GRID_FIG = """show(OUT / "grid" / "grid.png")"""

OUTRO = """\
The full study, with more seeds, a finer grid, Dynamic Task Prioritization and the paper's
seven values of alpha, is one command: `lossbalance toy --methods
equal,gradnorm,gradnorm-log,uncertainty,static,dtp,grid --out runs/toy`."""


def build() -> NotebookNode:
    """The notebook's cells, without outputs."""

    def code(source: str, *tags: str) -> NotebookNode:
        return new_code_cell(source, metadata={"tags": list(tags)} if tags else {})

    cells = [
        new_markdown_cell(INTRO),
        code(SETUP),
        new_markdown_cell(PROBLEM_MD),
        code(PROBLEM, TABLE),
        new_markdown_cell(LOOP_MD),
        code(LOOP, TABLE),
        code(LOOP_FIG, FIGURE),
        new_markdown_cell(LOOP_READ),
        new_markdown_cell(ALPHA_MD),
        code(ALPHA, TABLE),
        code(ALPHA_FIG, FIGURE),
        new_markdown_cell(GRID_MD),
        code(GRID, TABLE),
        code(GRID_FIG, FIGURE),
        new_markdown_cell(OUTRO),
    ]
    return new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    })


def execute(nb: NotebookNode, timeout: int = 1800) -> NotebookNode:
    """Run every cell in a fresh kernel started in examples/ (outputs filled in place)."""
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-execute", action="store_true",
                        help="write the cells without running them")
    args = parser.parse_args()
    nb = build()
    started = time.perf_counter()
    if not args.no_execute:
        execute(nb)
    nbformat.validate(nb)
    NOTEBOOK.write_text(nbformat.writes(nb))
    print(f"wrote {NOTEBOOK} ({NOTEBOOK.stat().st_size / 1024:.0f} KiB; executed in "
          f"{time.perf_counter() - started:.0f} s)" if not args.no_execute
          else f"wrote {NOTEBOOK} (not executed)")


if __name__ == "__main__":
    main()
