"""Writes examples/toy_demo.ipynb (kept as code so the notebook's cells are reviewed as text)."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell(
        "# GradNorm on the paper's toy problem\n\n"
        "Chen et al. (ICML 2018), Section 4: T regression tasks "
        "f_i(x) = sigma_i tanh((B + eps_i) x) with sigma = (1, 100). An unweighted sum lets the "
        "sigma = 100 task rule the shared trunk; GradNorm learns weights that equalise the "
        "tasks' gradient norms at the last shared layer.\n\n"
        "`LOSSBALANCE_DEMO_STEPS` sets the training length (the test suite runs this notebook "
        "with a few steps)."
    ),
    new_code_cell(
        "import os\n\n"
        "import matplotlib.pyplot as plt\n\n"
        "from lossbalance.experiments import toy\n\n"
        "steps = int(os.environ.get('LOSSBALANCE_DEMO_STEPS', '1500'))\n"
        "cfg = toy.ToyConfig(methods=('equal', 'gradnorm'), seeds=1, steps=steps, alphas=(),\n"
        "                    log_every=max(1, steps // 100), eval_every=max(1, steps // 10))\n"
        "rows, summaries = toy.run_study(cfg)\n"
        "for s in summaries:\n"
        "    losses = [round(v, 3) for v in s['test_loss']]\n"
        "    print(f\"{s['method']:>9}: test MSE per task {losses}, \"\n"
        "          f\"normalised total {s['normalized_test_loss']:.4f}, \"\n"
        "          f\"final weights {[round(w, 3) for w in s['final_weights']]}\")"
    ),
    new_code_cell(
        "fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))\n"
        "for method, style in (('gradnorm', '-'), ('equal', ':')):\n"
        "    mine = [r for r in rows if r['method'] == method]\n"
        "    steps_ = [r['step'] for r in mine]\n"
        "    for i in range(cfg.tasks):\n"
        "        label = f'{method} task {i} (sigma={cfg.sigmas[i]:g})'\n"
        "        axes[0].plot(steps_, [r[f'weight_{i}'] for r in mine], style, label=label)\n"
        "        axes[1].plot(steps_, [r[f'loss_ratio_{i}'] for r in mine], style, label=label)\n"
        "axes[0].set_title('task weights w_i')\n"
        "axes[1].set_title('loss ratios L_i(t) / L_i(0)')\n"
        "for ax in axes:\n"
        "    ax.set_yscale('log')\n"
        "    ax.set_xlabel('step')\n"
        "    ax.legend(fontsize=7)\n"
        "plt.tight_layout()"
    ),
]
nb = new_notebook(cells=cells, metadata={
    "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
Path(__file__).with_name("toy_demo.ipynb").write_text(nbformat.writes(nb))
