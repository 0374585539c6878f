"""report.html of `pvp eval`: the summary table and matplotlib plots (PNG files beside it, embedded too)."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pvp_contract.atomic import write_bytes, write_text  # noqa: E402

LABELS = {"avatar": "avatar (PVP)", "nearest_pivot": "nearest pivot", "nearest_frame": "nearest training frame",
          "nearest_pose_frame": "training frame nearest in head pose",
          "ground_truth_retracked": "real frames, re-tracked (the tracker's error)"}
COLUMNS = (("psnr", "PSNR dB ↑", "{:.2f}"), ("psnr_worst10", "PSNR worst 10% ↑", "{:.2f}"),
           ("ssim", "SSIM ↑", "{:.3f}"), ("lpips", "LPIPS ↓", "{:.3f}"), ("sharpness", "sharpness / real", "{:.2f}"),
           ("yaw_err", "yaw err ° ↓", "{:.2f}"), ("pitch_err", "pitch err ° ↓", "{:.2f}"),
           ("jaw_err", "jaw err ° ↓", "{:.2f}"), ("expr_err", "expr err sd ↓", "{:.2f}"),
           ("yaw_shift", "yaw shift, expression only ° ↓", "{:.2f}"),
           ("pitch_shift", "pitch shift, expression only ° ↓", "{:.2f}"),
           ("size_shift", "head size shift, expression only % ↓", "{:.1f}"))


def _save(fig, out: Path, name: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(out / name, buf.getvalue())
    return base64.b64encode(buf.getvalue()).decode()


def coverage_plot(result, out: Path) -> str:
    tr, ev = result.train_set.controls, result.eval_set.controls
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(tr[:, 0], tr[:, 1], s=8, c="0.6", label=f"training frames ({len(tr)})")
    if result.pivot_positions is not None:
        p = tr[result.pivot_positions]
        ax.scatter(p[:, 0], p[:, 1], s=40, facecolors="none", edgecolors="red", label=f"pivots ({len(p)})")
    ax.scatter(ev[:, 0], ev[:, 1], s=10, marker="x", c="tab:blue", label=f"evaluated frames ({len(ev)})")
    ax.set_xlabel("yaw (°, > 0: nose to image right)")
    ax.set_ylabel("pitch (°, > 0: up)")
    ax.set_title("Head-pose coverage")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out, "coverage.png")


def manifold_plot(result, samples: np.ndarray, out: Path) -> str:
    """Pivot frames (their real crops) over samples of the avatar's manifold (random controls)."""
    tr = result.train_set
    pivots = tr.images[result.pivot_positions[:8]] if result.pivot_positions is not None else tr.images[:8]
    n = max(len(pivots), len(samples))
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 3))
    for row, (images, title) in enumerate(((pivots, "pivots"), (samples, "manifold samples"))):
        for j in range(n):
            ax = axes[row, j]
            ax.axis("off")
            if j < len(images):
                ax.imshow(images[j])
        axes[row, 0].set_title(title, fontsize=8, loc="left")
    return _save(fig, out, "manifold.png")


def metrics_plot(result, out: Path) -> str:
    frames = result.eval_set.frame_index
    names = [m for m in ("psnr", "ssim", "lpips") if any(m in r for r in result.per_frame.values())]
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.2 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        for method, metrics in result.per_frame.items():
            if name in metrics:
                ax.plot(frames, metrics[name], label=LABELS[method], lw=1)
        ax.set_ylabel(name.upper())
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("frame")
    axes[0, 0].set_title("Metrics over the evaluated frames")
    return _save(fig, out, "metrics.png")


def retrack_plot(result, out: Path) -> str:
    frames, c = result.eval_set.frame_index, result.eval_set.controls
    fig, axes = plt.subplots(2, 1, figsize=(8, 4.4), sharex=True)
    for ax, key, col in ((axes[0], "yaw", 0), (axes[1], "pitch", 1)):
        ax.plot(frames, c[:, col], "k-", lw=1.5, label="requested (tracked from the video)")
        for method in ("avatar", "ground_truth"):
            if method in result.retracked:
                label = "re-tracked avatar render" if method == "avatar" else "re-tracked real frame"
                ax.plot(frames, result.retracked[method][key], lw=1, label=label)
        ax.set_ylabel(f"{key} (°)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title("Control accuracy: re-tracking")
    axes[1].set_xlabel("frame")
    return _save(fig, out, "retrack.png")


def strips_plot(result, out: Path) -> str:
    """Ground truth beside each method's render for the best, median and worst frames (avatar PSNR)."""
    score = result.per_frame["avatar"]["psnr"]
    order = np.argsort(score)
    picks = [("best", order[-1]), ("median", order[len(order) // 2]), ("worst", order[0])]
    methods = [m for m in LABELS if m in result.renders]
    fig, axes = plt.subplots(len(picks), 1 + len(methods), figsize=(1.9 * (1 + len(methods)), 2.1 * len(picks)))
    for r, (label, i) in enumerate(picks):
        axes[r, 0].imshow(result.eval_set.images[i])
        axes[r, 0].set_title(f"{label}: frame {result.eval_set.frame_index[i]}", fontsize=8)
        for j, m in enumerate(methods, 1):
            axes[r, j].imshow(result.renders[m][i])
            axes[r, j].set_title(f"{LABELS[m]}\n{result.per_frame[m]['psnr'][i]:.1f} dB", fontsize=7)
        for ax in axes[r]:
            ax.axis("off")
    return _save(fig, out, "strips.png")


def table_html(summary: dict) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t, _ in COLUMNS)
    rows = []
    for method, values in summary["methods"].items():
        cells = "".join(f"<td>{f.format(values[k]) if k in values else '—'}</td>" for k, _, f in COLUMNS)
        rows.append(f"<tr><th>{html.escape(LABELS.get(method, method))}</th>{cells}</tr>")
    return f"<table><tr><th>method</th>{head}</tr>{''.join(rows)}</table>"


def where_measured(probes: dict) -> str:
    """' inside the face' when the sharpness probes were measured there (`pvp eval --mask face`)."""
    return " inside the face" if probes.get("region") == "face" else ""


def probes_html(summary: dict) -> str:
    """Sharpness away from the evaluated frames, and the requests the renderer clamped."""
    p, c = summary["sharpness"], summary["clamped"]
    sliders = ", ".join(f"{html.escape(k)} {v:.2f}" for k, v in p["per_slider"].items())
    excess = ", ".join(f"{html.escape(k)} by up to {v:g}" for k, v in c["max_excess"].items()) or "none"
    return (f"<p>Sharpness{where_measured(p)} against the real training frames' (1: as sharp): recombined "
            f"training controls {p['recombined']:.2f}; each slider swept alone over its range {p['slider_sweeps']:.2f} "
            f"(worst: {html.escape(p['worst_slider'][0])} {p['worst_slider'][1]:.2f}; {sliders}).</p>"
            f"<p>Requests beyond the learned ranges (clamped by the renderer): {c['frames']} of {c['of']} "
            f"frames; {excess}.</p>")


RANGE_PARTS = {"within": "within the learned ranges", "beyond": "beyond the learned ranges (clamped)"}


def range_table(summary: dict) -> tuple[list[str], list[list[str]]] | str:
    """(headers, rows): each method's PSNR (worst 10%) and SSIM over the frames requested within the learned
    ranges and over those the renderer clamped; or one line when all frames fall in one part."""
    parts = summary["by_range"]
    for part, title in RANGE_PARTS.items():
        if parts[part]["frames"] == sum(p["frames"] for p in parts.values()):
            return f"all {parts[part]['frames']} frames requested {title}"
    headers = ["PSNR dB (worst 10%) / SSIM"] + [f"{t}: {parts[p]['frames']} frames" for p, t in RANGE_PARTS.items()]
    rows = []
    for method in summary["methods"]:
        cells = [parts[p]["methods"].get(method, {}) for p in RANGE_PARTS]
        if all("psnr" in v for v in cells):
            rows.append([LABELS.get(method, method),
                         *(f"{v['psnr']:.2f} ({v['psnr_worst10']:.2f}) / {v.get('ssim', float('nan')):.3f}"
                           for v in cells)])
    return headers, rows


def range_html(summary: dict) -> str:
    table = range_table(summary)
    if isinstance(table, str):
        return f"<p>{html.escape(table)}.</p>"
    headers, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + f"<th>{html.escape(r[0])}</th>" + "".join(f"<td>{c}</td>" for c in r[1:]) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def console_lines(summary: dict) -> list[str]:
    """The summary as an aligned text table, the sharpness and clamping figures, then the image figures
    within and beyond the learned ranges."""
    present = [(k, title, fmt) for k, title, fmt in COLUMNS if any(k in v for v in summary["methods"].values())]
    label = max(len(LABELS.get(m, m)) for m in summary["methods"]) + 2
    widths = [max(len(title), 6) + 2 for _, title, _ in present]
    lines = [f"{'method':<{label}}" + "".join(f"{title:>{w}}" for (_, title, _), w in zip(present, widths))]
    for method, values in summary["methods"].items():
        cells = "".join(f"{fmt.format(values[k]) if k in values else '-':>{w}}"
                        for (k, _, fmt), w in zip(present, widths))
        lines.append(f"{LABELS.get(method, method):<{label}}{cells}")
    p, c = summary["sharpness"], summary["clamped"]
    lines.append(f"sharpness{where_measured(p)} / real training frames: recombined controls {p['recombined']:.2f}, "
                 f"slider sweeps {p['slider_sweeps']:.2f} (worst {p['worst_slider'][0]} {p['worst_slider'][1]:.2f})")
    lines.append(f"clamped requests: {c['frames']} of {c['of']} frames"
                 + "".join(f", {k} by up to {v:g}" for k, v in c["max_excess"].items()))
    table = range_table(summary)
    if isinstance(table, str):
        return [*lines, table]
    widths = [max(len(r[j]) for r in [table[0], *table[1]]) + 2 for j in range(len(table[0]))]
    return lines + ["".join(f"{cell:<{w}}" for cell, w in zip(r, widths)).rstrip() for r in [table[0], *table[1]]]


def ground_truth_plot(gt: dict, out: Path) -> str:
    series = gt["series"]
    fig, axes = plt.subplots(3, 1, figsize=(8, 6), sharex=True)
    for ax, key in zip(axes, ("yaw", "pitch", "jaw")):
        ax.plot(series["truth"][key], "k-", lw=1.5, label="ground truth (synthetic clip)")
        ax.plot(series["keyed"][key], lw=1, label="keyed in Blender (tracked, imported)")
        ax.plot(series["render"][key], lw=1, label="re-tracked from the rendered animation")
        ax.plot(series["real"][key], lw=1, ls="--", label="re-tracked from the real frames, shown the same way")
        ax.set_ylabel(f"{key} (°)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title("Animation against the synthetic subject's known head rotation and jaw")
    axes[-1].set_xlabel("animation frame")
    return _save(fig, out, "ground_truth.png")


def ground_truth_table(gt: dict) -> str:
    rows = "".join(
        f"<tr><th>{k}</th><td>{gt[k]['keyed_median_abs_err_deg']:.2f}</td>"
        f"<td>{gt[k]['real_median_abs_err_deg']:.2f}</td>"
        f"<td>{gt[k]['render_median_abs_err_deg']:.2f}</td>"
        f"<td>{'—' if gt[k]['render_corr'] is None else format(gt[k]['render_corr'], '.3f')}</td></tr>"
        for k in ("yaw", "pitch", "jaw"))
    return ("<table><tr><th>control</th><th>keyed vs truth, median |err| °</th>"
            "<th>real frames shown the same way, re-tracked, vs truth (the re-tracker's error), median |err| °</th>"
            "<th>rendered vs truth, median |err| °"
            f"</th><th>rendered vs truth, correlation</th></tr>{rows}</table>")


def write_report(result, summary: dict, out: Path, ground_truth: dict | None = None) -> Path:
    figures = [("Head-pose coverage of the training frames, the pivots and the evaluated frames",
                coverage_plot(result, out)),
               ("Pivots and samples of the avatar's manifold (training controls recombined: one frame's head pose, "
                "another's jaw and expression)",
                manifold_plot(result, result.samples, out)),
               ("Metrics over time", metrics_plot(result, out))]
    if result.retracked:
        figures.append(("Requested against re-tracked head pose", retrack_plot(result, out)))
    figures.append(("Ground truth and renders: best, median and worst frames", strips_plot(result, out)))
    body = "".join(f"<h2>{html.escape(t)}</h2><img src='data:image/png;base64,{b}'>" for t, b in figures)
    if ground_truth is not None:
        body += (f"<h2>Control accuracy against the known ground truth ({ground_truth['frames']} animation frames)</h2>"
                 f"{ground_truth_table(ground_truth)}<img src='data:image/png;base64,"
                 f"{ground_truth_plot(ground_truth, out)}'>")
    mask = "inside the face mask" if summary["mask"] == "face" else "whole crop"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>pvp eval</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}img{{max-width:100%}}</style></head><body>
<h1>pvp eval</h1>
<p>Avatar <code>{html.escape(summary['avatar'])}</code>; video <code>{html.escape(summary['video'])}</code>,
frames {html.escape(summary['frames'])} ({summary['evaluated_frames']} with a face); metrics {mask};
LPIPS: {html.escape(str(summary['lpips']))}. Image metrics are means, control errors medians (re-tracking
with the differentiable MediaPipe tracker in the avatar's expression space). The shifts: how far the
re-tracked head pose moves when a frame is rendered again with only its jaw and expression replaced by
those of a random training frame.</p>
{table_html(summary)}
{probes_html(summary)}
<p>The same figures over the frames whose requests lie within the learned ranges, and over those the renderer
clamped (it cannot show what the avatar never learned):</p>
{range_html(summary)}
{body}
</body></html>
"""
    path = out / "report.html"
    write_text(path, page)
    return path
