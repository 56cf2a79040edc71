"""DDT plot: the phi distribution of a scored corpus (and of the model's own samples) as a PNG."""

from __future__ import annotations

import numpy as np

from trl_onpolicy.ddt.scoring import DDTResult
from trl_onpolicy.ddt.statistics import HIST_BINS, HIST_RANGE


def plot_phi_distribution(path, result: DDTResult, own: DDTResult | None = None, title: str | None = None) -> None:
    """PNG: token-level phi histogram (left) and per-sample mean phi histogram (right), corpus vs own samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series = [("corpus", result, "tab:blue")] + ([("own samples (T=1)", own, "tab:orange")] if own else [])
    for label, res, color in series:
        tok = [a["phi"] for a in res.tokens if a is not None]
        phi = np.clip(np.concatenate(tok), *HIST_RANGE) if tok else np.zeros(0)
        s = res.summary
        axes[0].hist(phi, bins=HIST_BINS, range=HIST_RANGE, density=True, alpha=0.5, color=color,
                     label=f"{label}: mean {s['mean_phi']:.3f}, std {s['std_phi']:.2f}, n={s['num_tokens']}")
        means = [r["mean_phi"] for r in res.samples if not r.get("skipped")]
        axes[1].hist(means, bins=40, alpha=0.5, color=color, label=f"{label}: mean z {s['mean_z']:.2f}")
    axes[0].axvline(0, color="k", lw=0.8)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("phi = log p + H per completion token (clipped)")
    axes[0].set_ylabel("density (log scale)")
    axes[0].legend(fontsize=8)
    axes[1].axvline(0, color="k", lw=0.8)
    axes[1].set_xlabel("mean phi per sample")
    axes[1].set_ylabel("samples")
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
