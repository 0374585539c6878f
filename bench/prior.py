"""The from-scratch prior away from its training frames (issue 20): per clip and variant, a whole fit on the
first 80% of the frames (prior and mappers), then `pvp eval` on the held-out last 20% — the avatar against
the nearest pivot, the nearest training frame and the training frame nearest in head pose: mean and
worst-10% PSNR, SSIM, sharpness (render / real), control errors, plus the sharpness of the slider sweeps and
of recombined training controls, the clamped requests and the fit's time.

    python bench/prior.py [--preset tiny] [--clips lp_d3 lp_d12] [--variants base ...] [--set KEY=VALUE ...]
                          [--resume]

Writes bench/results/prior_<preset>.json after every fit (a rerun skips the rows already there; with --resume it
continues a fit a stopped run left, whose row is marked "resumed": its prior and mapper stages' seconds are their
training loops' over every run, without the stages' set-up and the process's start, and the other stages' this
run's; a variant in SHARED_PRIOR starts over). The clips' track, aligned frames and pivots are made once per clip
and shared by its variants (``--prepare`` makes the tracks alone, for bench/prior_gpu.sh). A variant in SHARED_PRIOR
starts from another variant's prior stage (its fit with the same label, or --prior-label's, and seed, else the same
seed) when that fit trained the same prior — its generator and latents, or its prior checkpoint where the generator
trained on with the mappers (the row says so, with that prior's seconds): variants that differ only in the mapper
stage then cost a mapper stage each.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import (  # noqa: E402
    RESULTS,
    evaluate,
    held_out_split,
    print_table,
    rounded,
    run_pvp,
    shared_stages,
    write_results,
)

DATA = Path("tests") / "data"  # relative to the repository (pvp runs there): a track made here reads its video there
# variant -> (what it changes, `--set` items). Each is measured against the preset before this terms:
# what tiny took on since (the energy terms, the generator trained with the mappers, 6000 prior steps,
# bfloat16 renders, more expression coefficients, crops sized by the head) is pinned back first, and a variant's
# items override it ("preset": the preset as it is; a third item: `--set` items on the preset as it is, nothing
# pinned back).
TERMS_OFF = ["prior_detail_energy=0", "objective.detail_energy=0", "mapper_generator_lr=0", "prior_steps=4000",
             "prior_precision=float32", "mapper_precision=float32", "expression_variance=0.98", "crop_scale=ffhq"]
INBETWEEN = ["prior_inbetween=0.5"]
ADVERSARIAL = ["prior_adversarial=0.05"]
TUNE = ["mapper_generator_lr=2e-4"]
DETAIL = ["prior_detail=1.0"]
DETAIL_ENERGY = ["prior_detail_energy=0.5"]
MAPPER_ENERGY = ["objective.detail_energy=5"]  # the objective's L2 and perceptual weigh 10: 10x the prior's
VARIANTS = {
    "preset": ("the preset as it is", None),
    "frozen": ("the preset with its generator frozen in the mapper stage", None, ["mapper_generator_lr=0"]),
    "mappers": ("the preset with --set items in the mapper stage (its prior shared)", None, []),
    "base": ("the preset before this issue's terms (tiny at b049af2)", []),
    "inbetween": ("half of each prior batch rendered from two neighbours' latents blended to its time", INBETWEEN),
    "adversarial": ("an adversarial term (weight 0.05) on renders of blended latents", ADVERSARIAL),
    "tune": ("the generator trained with the mappers (lr 2e-4)", TUNE),
    "all": ("in-betweens, the adversarial term and the generator trained with the mappers",
            INBETWEEN + ADVERSARIAL + TUNE),
    "inbetween_tune": ("in-betweens and the generator trained with the mappers", INBETWEEN + TUNE),
    "inbetween_tune_detail": ("in-betweens, the Laplacian L1 term and the generator trained with the mappers",
                              INBETWEEN + DETAIL + TUNE),
    "detail_energy": ("the fine-detail energy term (weight 0.5)", DETAIL_ENERGY),
    "detail_energy_0.25": ("the fine-detail energy term (weight 0.25)", ["prior_detail_energy=0.25"]),
    "detail_energy_tune": ("the fine-detail energy term and the generator trained with the mappers",
                           DETAIL_ENERGY + TUNE),
    "detail_energy_mappers": ("the fine-detail energy term in the prior (0.5) and the mappers' objective (5)",
                              DETAIL_ENERGY + MAPPER_ENERGY),
    "detail_energy_tune_mappers": ("the fine-detail energy term in the prior (0.5) and the mappers' objective (5), "
                                   "the generator trained with the mappers (tiny as it is now)",
                                   DETAIL_ENERGY + MAPPER_ENERGY + TUNE),
}
# variant -> the variant whose prior stage it may start from
SHARED_PRIOR = {"detail_energy_tune": "detail_energy", "detail_energy_mappers": "detail_energy",
                "detail_energy_tune_mappers": "detail_energy", "frozen": "preset", "mappers": "preset"}
# preset fields that do not change a from-scratch prior (checkpoint_every: only where it stops; the bench
# passes no --prior, so lr_schedule's pivotal tuning never runs)
MAPPER_STAGE = ("objective", "standardize_mapper_inputs", "lr_schedule", "checkpoint_every",
                "expression_variance")  # and mapper_*; the prior reads a fixed count of expressions
METHODS = ("avatar", "nearest_pivot", "nearest_frame", "nearest_pose_frame")
COLUMNS = ("psnr", "psnr_worst10", "ssim", "sharpness", "yaw_err", "pitch_err", "jaw_err", "expr_err", "yaw_shift",
           "pitch_shift", "size_shift")


def variant_items(variant: str, extra: list[str]) -> list[str]:
    """A variant's `--set` items, with the preset's later terms pinned back first where it asks, and ``extra``."""
    _, items, *on_preset = VARIANTS[variant]
    return ([] if items is None else TERMS_OFF) + extra + (items or []) + [i for x in on_preset for i in x]


def share_stages(source: Path, dest: Path) -> bool:
    """Copy the stages every variant of a clip shares (track, aligned frames, pivots) that ``dest`` lacks;
    True if ``source`` has any."""
    files = [f for f in source.glob("*") if f.name in ("track.safetensors", "pivots.json")
             or f.name.startswith("frames_")] if source.is_dir() else []
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        if not (dest / f.name).is_file():  # through a name of its own: variants running beside it read it
            part = dest / f"{f.name}.{os.getpid()}.part"
            shutil.copy2(f, part)
            part.replace(dest / f.name)
    return bool(files)


def share_prior(source: Path, dest: Path, settings: dict) -> float | str:
    """Copy the prior stage of the fit whose work directory is ``source`` into ``dest`` when that fit's
    settings.json matches ``settings`` (a fit's) but for MAPPER_STAGE's fields: its generator and latents when
    the generator is still the prior's, else the prior's last checkpoint (the fit, resumed, takes the prior from
    it). That prior stage's seconds, or why not."""
    def prior_part(s: dict) -> dict:
        preset = {k: v for k, v in s["preset"].items() if k not in MAPPER_STAGE and not k.startswith("mapper_")}
        return {**s, "preset": preset}

    try:
        previous = json.loads((source / "settings.json").read_text())
        seconds = json.loads((source / "metrics.json").read_text())["stage_seconds"]["prior"]
        if prior_part(previous) != prior_part(settings):
            return f"{source}: another prior's settings"
        names = ["generator.safetensors", "latents.safetensors", "metrics.json"]
        if previous["preset"].get("mapper_generator_lr", 0) > 0:  # the generator moved on: the prior's checkpoint
            names = ["prior_checkpoint.pt"]
        missing = [n for n in names if not (source / n).is_file()]
        if missing:
            raise OSError(f"no {', '.join(missing)}")
    except (OSError, KeyError, ValueError) as e:
        return f"{source}: no finished fit to share a prior with ({e})"
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        part = dest / f"{name}.part"
        shutil.copy2(source / name, part)
        part.replace(dest / name)
    return seconds


def fit_settings(video: Path, preset: str, train: str, items: list[str], seed: int) -> dict:
    """The settings.json a bench `pvp fit` with these `--set` items and seed writes (no weights)."""
    from pvp.fit.pipeline import FitInputs
    from pvp.fit.presets import PRESETS, apply_settings

    chosen = apply_settings(PRESETS[preset], items)
    return FitInputs(video, Path(), chosen, train_frames=train, pivot_method=chosen.pivot_selection,
                     seed=seed).settings()


def machine() -> str:
    import torch

    from bench.common import device_description

    return device_description("cuda" if torch.cuda.is_available() else "cpu")


def score(summary: dict) -> dict:
    """One row per method of a `pvp eval` summary.json, with the avatar's probes and clamped requests, and the
    same figures over the frames requested within the learned ranges and beyond them ('within', 'beyond')."""
    rows = {}
    for method in METHODS:
        rows[method] = rounded(summary["methods"].get(method, {}), COLUMNS)
        for part, split in summary.get("by_range", {}).items():
            if method in split["methods"]:
                rows[method][part] = {"frames": split["frames"], **rounded(split["methods"][method], COLUMNS)}
    probes = summary["sharpness"]
    rows["avatar"].update(sharpness_sweeps=round(probes["slider_sweeps"], 3),
                          sharpness_recombined=round(probes["recombined"], 3), worst_slider=probes["worst_slider"],
                          clamped_frames=f"{summary['clamped']['frames']}/{summary['clamped']['of']}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--clips", nargs="+", default=["lp_d3", "lp_d12"])
    ap.add_argument("--variants", nargs="+", default=["base"], choices=list(VARIANTS))
    ap.add_argument("--label", default="", help="added to each row's variant name (e.g. 'before')")
    ap.add_argument("--prior-label", help="the label of the fit whose prior the variants that share one start from "
                    "(default: --label's, then none)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "prior")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a preset override for every fit")
    ap.add_argument("--seed", type=int, default=0,
                    help="every fit's seed (the clip's pivots stay those of its first fit)")
    ap.add_argument("--out", type=Path, help="results file (default bench/results/prior_<preset>.json)")
    ap.add_argument("--prepare", action="store_true", help="only track the clips (for a machine without MediaPipe)")
    ap.add_argument("--resume", action="store_true",
                    help="continue a fit an earlier run left unfinished (a fit longer than a session), not start "
                         "over; not the variants that share a prior")
    args = ap.parse_args(argv)
    from pvp.fit.presets import PRESETS, apply_settings

    if args.prepare:  # the tracks the variants asked for will read: one per clip and crop rule
        for clip in args.clips:
            for preset in {apply_settings(PRESETS[args.preset], variant_items(v, args.set)) for v in args.variants}:
                track = shared_stages(args.work, preset, clip) / "track.safetensors"
                if not track.is_file():
                    run_pvp(["track", str(DATA / f"{clip}.mp4"), "-o", str(track), "--crop-scale",
                             preset.crop_scale], "bench/prior.py")
        return

    out_json = args.out or RESULTS / f"prior_{args.preset}.json"
    rows = json.loads(out_json.read_text())["rows"] if out_json.is_file() else []
    seed_suffix = f"_seed{args.seed}" if args.seed else ""
    suffix = args.label + seed_suffix  # a fit's name: its variant and this
    for clip in args.clips:
        video = DATA / f"{clip}.mp4"
        train, held_out = held_out_split(ROOT / video)
        for variant in args.variants:
            name = f"{variant}{suffix}"
            if any(r["clip"] == clip and r["variant"] == name for r in rows):
                continue
            description = VARIANTS[variant][0]
            items = variant_items(variant, args.set)
            fit_args = [a for item in items for a in ("--set", item)]
            stages = shared_stages(args.work, apply_settings(PRESETS[args.preset], items), clip)
            out = args.work / args.preset / clip / name
            # a variant that shares another fit's prior starts over: its mapper stage is short, and sharing
            # again would copy that prior over what the stopped run left
            resumed = args.resume and variant not in SHARED_PRIOR and (out / "work" / "settings.json").is_file()
            if not resumed:
                shutil.rmtree(out, ignore_errors=True)
            reused = share_stages(stages, out / "work")
            shared_prior = None
            if variant in SHARED_PRIOR:
                settings = fit_settings(video, args.preset, train, items, args.seed)
                reasons = []
                labelled = (args.label if args.prior_label is None else args.prior_label) + seed_suffix
                for source_suffix in dict.fromkeys([labelled, seed_suffix]):  # the labelled source first
                    source = args.work / args.preset / clip / f"{SHARED_PRIOR[variant]}{source_suffix}" / "work"
                    shared = share_prior(source, out / "work", settings)
                    if not isinstance(shared, str):
                        shared_prior = shared
                        break
                    reasons.append(shared)
                else:
                    print("; ".join(reasons) + ": training the prior again", flush=True)
            t0 = time.perf_counter()
            run_pvp(["fit", str(video), "-o", str(out), "--preset", args.preset, "--train-frames", train, *fit_args,
                     "--seed", str(args.seed),
                     *(["--resume"] if reused or resumed or shared_prior is not None else [])],
                    "bench/prior.py")
            share_stages(out / "work", stages)
            fit_seconds = time.perf_counter() - t0
            summary = evaluate(out, video, held_out, out / "eval", "bench/prior.py")
            metrics = json.loads((out / "work" / "metrics.json").read_text())
            stages = metrics.get("stage_seconds", {})
            if resumed:  # this run's stage times, but the training loops' over every run
                stages = {**stages, "prior": round(metrics["prior_training"]["seconds"], 3),
                          "mappers": round(metrics["mapper_training"]["seconds"], 3)}
                fit_seconds = sum(stages.values())
            if shared_prior is not None:  # this run's seconds and that prior's, as if it had trained it
                stages["prior"] = shared_prior
                fit_seconds += shared_prior
            scores = score(summary)
            for method, values in scores.items():
                rows.append({"clip": clip, "variant": name, "changes": description, "settings": args.set,
                             **({"seed": args.seed} if args.seed else {}),
                             "held_out": held_out, "method": method, **values,
                             **({"fit_seconds": round(fit_seconds, 1), "stage_seconds": stages}
                                if method == "avatar" else {}),
                             **({"prior_of": source.parent.name} if shared_prior is not None else {}),
                             **({"resumed": True} if resumed and method == "avatar" else {})})
            write_results(f"prior_{args.preset}", machine(), rows, out_json)
            for part in ("", "within", "beyond"):
                values = scores["avatar"].get(part, {}) if part else scores["avatar"]
                print(f"{clip} {name} {part or 'all'}: " + ", ".join(f"{c} {values.get(c)}" for c in COLUMNS),
                      flush=True)
    print_table(rows, ["clip", "variant", "method", *COLUMNS, "sharpness_sweeps", "sharpness_recombined",
                       "fit_seconds"])


if __name__ == "__main__":
    main()
