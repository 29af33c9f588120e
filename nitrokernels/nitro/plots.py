"""Training plots a user reads: the loss curves and whether the discriminator keeps up (matplotlib, optional).

    save_loss_png(path, history)   history: the distiller's per-iteration dicts (NitroDistiller.history / log.jsonl)

Used by `nitrokernels distill` (loss.png under --out) and by the digits demo.
"""
from __future__ import annotations

__all__ = ["save_loss_png"]


def _plot_smoothed(ax, steps, values, label, **style):
    """Raw values faintly, a running mean (1/25 of the run) on top."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    line = ax.plot(steps, values, alpha=0.25, lw=0.8, **style)[0]
    k = max(1, len(values) // 25)
    if len(values) >= k > 1:
        smooth = np.convolve(values, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.8, label=label, color=line.get_color())
    else:
        line.set_label(label)


def save_loss_png(path: str, history: list[dict]) -> str:
    """Two panels: the losses, and what shows whether the discriminator keeps up (its accuracy per head kind,
    with chance at 0.5, and the mean age of the heads it used); a third with its accuracy per t* group when the
    history has it (the iterations that drew that group)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from nitrokernels.nitro.discriminator import t_star_of_key

    warmup = [r for r in history if "regression_loss" in r]
    adversarial = [r for r in history if "g_loss" in r]
    history = [r for r in history if "d_loss" in r]  # every iteration that trained the heads (both phases)
    steps = np.array([r["step"] for r in history])
    t_star_keys = sorted({(t_star_of_key(k), k) for r in history for k in r if t_star_of_key(k) is not None})
    fig, axes = plt.subplots(3 if t_star_keys else 2, 1, figsize=(6.4, 9.0 if t_star_keys else 6.4), sharex=True)
    ax, ax2 = axes[0], axes[1]
    _plot_smoothed(ax, steps, [r["d_loss"] for r in history], "discriminator (sampled heads, summed)")
    _plot_smoothed(ax, np.array([r["step"] for r in adversarial]), [r["g_loss"] for r in adversarial],
                   "generator (student)")
    ax.set_ylabel("loss")
    ax.set_title("NitroFusion distillation on the digits")
    if warmup:  # the regression warm-up before the adversarial phase, on its own scale
        mse = ax.twinx()
        mse.plot([r["step"] for r in warmup], [r["regression_loss"] for r in warmup], color="gray", lw=1,
                 label="warm-up regression (mse)")
        mse.set_ylabel("warm-up mse", fontsize=8)
        mse.legend(loc="center right", fontsize=8)
        for axis in axes:
            axis.axvline(warmup[-1]["step"], color="gray", lw=0.8, ls=":")
    ax.legend(fontsize=8)
    kinds = sorted({k.split("/")[0] for r in history for k in r if k.endswith("/d_accuracy")})
    for kind in kinds:
        _plot_smoothed(ax2, steps, [r.get(f"{kind}/d_accuracy", np.nan) for r in history], f"accuracy, {kind}")
    ax2.axhline(0.5, color="gray", lw=0.8, ls="--", label="chance")
    ax2.set_ylabel("discriminator accuracy")
    axes[-1].set_xlabel("iteration")
    if history and "head_age" in history[0]:
        age = ax2.twinx()
        age.plot(steps, [r["head_age"] for r in history], color="black", lw=0.8, alpha=0.6, label="mean head age")
        age.set_ylabel("updates of the sampled heads", fontsize=8)
        age.legend(loc="lower right", fontsize=8)
    ax2.legend(loc="upper left", fontsize=7)
    if t_star_keys:
        ax3 = axes[2]
        for t, key in t_star_keys:   # only the iterations that drew this group: a t* is sampled in a subset of them
            rows = [r for r in history if key in r]
            _plot_smoothed(ax3, np.array([r["step"] for r in rows]), [r[key] for r in rows], f"accuracy, t* = {t}")
        ax3.axhline(0.5, color="gray", lw=0.8, ls="--", label="chance")
        ax3.set_ylabel("accuracy per t* group")
        ax3.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
