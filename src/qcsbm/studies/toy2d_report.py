"""Tables and figures of the 2-D study."""

from __future__ import annotations

import logging

import numpy as np
import torch

from qcsbm.data.toy2d import get_toy_dataset
from qcsbm.likelihood import log_likelihood
from qcsbm.studies import common

logger = logging.getLogger(__name__)

KIND_COLORS = {"usbm": "tab:red", "csbm": "tab:blue", "qcsbm": "tab:green"}
PLOT_LIMIT = 7.0   # half-width of the plotted square; the data sets lie within about [-6, 6]


def _label(model: str, lambda_qc: float) -> str:
    return f"QCSBM (lambda {lambda_qc:g})" if model == "qcsbm" else model.upper()


def _format(entry: dict) -> str:
    mean, std = entry["mean"], entry["std"]
    magnitude = max(abs(mean), 1e-300)
    if magnitude >= 1e-2 and magnitude < 1e4:
        return f"{mean:.4g} ± {std:.2g}"
    return f"{mean:.3e} ± {std:.1e}"


def markdown_table(summary: list, metric_keys) -> str:
    """Return the comparison as a Markdown table: mean ± std across seeds."""
    header = "| data set | model | seeds | " + " | ".join(metric_keys) + " |"
    rule = "|" + "---|" * (3 + len(metric_keys))
    rows = [header, rule]
    for entry in summary:
        cells = [entry["dataset"], _label(entry["model"], entry["lambda_qc"]),
                 str(len(entry["seeds"]))]
        cells += [_format(entry[key]) for key in metric_keys]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def write_figures(out, config, sde, summary, curves, samples, *, quiet=False) -> None:
    """Write samples.png, score_field.png, density.png, asymmetry.png and, for a list of
    lambda_qc values, lambda_tradeoff.png, one figure per data set."""
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    for name in config.datasets:
        keys = [key for key in samples if key[0] == name]
        dataset = get_toy_dataset(name)
        _samples_figure(figures / f"{name}_samples.png", dataset, keys, samples)
        _score_field_figure(figures / f"{name}_score_field.png", dataset, sde, keys, samples)
        _density_figure(figures / f"{name}_density.png", dataset, sde, keys, samples, config)
        _asymmetry_figure(figures / f"{name}_asymmetry.png", keys, curves)
        if len(config.lambda_qc) > 1 and "qcsbm" in config.models:
            _tradeoff_figure(figures / f"{name}_lambda_tradeoff.png", name, summary)


def _square_axes(axis, title):
    axis.set_xlim(-PLOT_LIMIT, PLOT_LIMIT)
    axis.set_ylim(-PLOT_LIMIT, PLOT_LIMIT)
    axis.set_aspect("equal")
    axis.set_title(title, fontsize=10)
    axis.set_xticks([])
    axis.set_yticks([])


def _color(key, keys):
    """Return the plot color of a model: one per kind, shades of green for QCSBM lambdas."""
    if key[1] != "qcsbm":
        return KIND_COLORS.get(key[1], "gray")
    lambdas = sorted(k[2] for k in keys if k[1] == "qcsbm")
    if len(lambdas) == 1:
        return KIND_COLORS["qcsbm"]
    from matplotlib import colormaps

    return colormaps["Greens"](0.4 + 0.6 * lambdas.index(key[2]) / (len(lambdas) - 1))


def _samples_figure(path, dataset, keys, samples):
    figure, axes = common.new_figure(len(keys) + 1, panel_size=3.2)
    data = dataset.sample(len(samples[keys[0]][1]), torch.Generator().manual_seed(0))
    axes[0].scatter(data[:, 0], data[:, 1], s=1, alpha=0.3, color="black")
    _square_axes(axes[0], f"data ({dataset.name})")
    for axis, key in zip(axes[1:], keys):
        points = samples[key][1]
        axis.scatter(points[:, 0], points[:, 1], s=1, alpha=0.3, color=_color(key, keys))
        _square_axes(axis, _label(key[1], key[2]) + " samples")
    common.save_figure(figure, path)


def _grid(num: int):
    axis = torch.linspace(-PLOT_LIMIT, PLOT_LIMIT, num)
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    return xx, yy, torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def _score_field_figure(path, dataset, sde, keys, samples, sigma=0.5):
    xx, yy, points = _grid(24)
    t = sde.time_of_sigma(torch.full((points.shape[0],), sigma))
    figure, axes = common.new_figure(len(keys) + 1, panel_size=3.2)
    fields = [("exact score", dataset.score(points, sigma).float())]
    for key in keys:
        model = samples[key][0]
        with torch.no_grad():
            fields.append((_label(key[1], key[2]), model(points, t).cpu()))
    for axis, (title, field) in zip(axes, fields):
        u = field[:, 0].reshape(xx.shape).numpy()
        v = field[:, 1].reshape(xx.shape).numpy()
        speed = np.log10(np.hypot(u, v) + 1e-12)
        axis.streamplot(xx.numpy(), yy.numpy(), u, v, color=speed, cmap="viridis",
                        density=1.1, linewidth=0.7, arrowsize=0.7)
        _square_axes(axis, f"{title}, sigma {sigma:g}")
    common.save_figure(figure, path)


def _density_figure(path, dataset, sde, keys, samples, config):
    xx, _, points = _grid(config.density_grid)
    figure, axes = common.new_figure(len(keys) + 1, panel_size=3.2)
    densities = [("exact", dataset.log_prob(points, config.sigma_min).exp())]
    for key in keys:
        model = samples[key][0]
        result = log_likelihood(model, sde, points, divergence="exact", rtol=config.ode_rtol,
                                atol=config.ode_atol)
        densities.append((_label(key[1], key[2]), result.logp.exp().cpu()))
    for axis, (title, density) in zip(axes, densities):
        axis.imshow(density.reshape(xx.shape).numpy(), origin="lower", cmap="magma",
                    extent=(-PLOT_LIMIT, PLOT_LIMIT, -PLOT_LIMIT, PLOT_LIMIT))
        _square_axes(axis, f"{title} density")
    common.save_figure(figure, path)


def _asymmetry_figure(path, keys, curves):
    figure, axes = common.new_figure(2, panel_size=4.0)
    for key in keys:
        runs = curves[key]
        std = runs[0]["std"]
        color = _color(key, keys)
        for axis, name in zip(axes, ("asym", "nasym")):
            values = np.array([run[name] for run in runs])
            mean = values.mean(axis=0)
            # Log axes cannot show the energy model's exact zeros; plot them at 1e-16.
            axis.plot(std, np.maximum(mean, 1e-16), marker="o", color=color,
                      label=_label(key[1], key[2]))
            if len(runs) > 1:
                spread = values.std(axis=0)
                axis.fill_between(std, np.maximum(mean - spread, 1e-16), mean + spread,
                                  color=color, alpha=0.2)
    for axis, name in zip(axes, ("Asym", "NAsym")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("noise std sigma")
        axis.set_ylabel(name)
        axis.legend(fontsize=8)
    common.save_figure(figure, path)


def _tradeoff_figure(path, dataset_name, summary):
    entries = sorted((e for e in summary if e["dataset"] == dataset_name
                      and e["model"] == "qcsbm"), key=lambda e: e["lambda_qc"])
    lambdas = [e["lambda_qc"] for e in entries]
    figure, axes = common.new_figure(4, panel_size=3.2)
    for axis, key in zip(axes, ("nasym", "nll", "score_error", "nfe")):
        means = [e[key]["mean"] for e in entries]
        stds = [e[key]["std"] for e in entries]
        axis.errorbar(lambdas, means, yerr=stds, marker="o", color=KIND_COLORS["qcsbm"])
        for other in ("usbm", "csbm"):
            reference = [e for e in summary if e["dataset"] == dataset_name
                         and e["model"] == other]
            if reference:
                axis.axhline(reference[0][key]["mean"], color=KIND_COLORS[other],
                             linestyle="--", label=other.upper())
        if all(value > 0 for value in lambdas):
            axis.set_xscale("log")
        elif any(value > 0 for value in lambdas):
            positive = min(value for value in lambdas if value > 0)
            axis.set_xscale("symlog", linthresh=positive)
        axis.set_xlabel("lambda_qc")
        axis.set_title(key, fontsize=10)
        axis.legend(fontsize=7)
    common.save_figure(figure, path)
