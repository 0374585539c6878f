"""The ``pvp`` command. Each subcommand parses its arguments here and calls into a plain module."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pvp import __version__


class UserError(Exception):
    """Bad input from the user: printed as one clear line, no traceback."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def cmd_generate(args) -> None:
    import torch

    from pvp.checkpoints import load_generator
    from pvp.images import save_png
    from pvp.models.generator import Generator, GeneratorConfig, to_uint8, z_from_seed

    device = _device(args.device)
    if args.checkpoint:
        G = load_generator(args.checkpoint, device=device)
    else:
        torch.manual_seed(args.random_weights_seed)
        blocks = GeneratorConfig(args.resolution).num_blocks
        cfg = GeneratorConfig(resolution=args.resolution, channels=(64,) * blocks, z_dim=64, w_dim=64, mapping_layers=4)
        G = Generator(cfg).eval().requires_grad_(False).to(device)
        G.mapping.w_avg.copy_(G.estimate_w_avg())
    z = z_from_seed(args.seed, G.cfg.z_dim).to(device)
    with torch.no_grad():
        img = G(z, truncation_psi=args.truncation, noise_mode=args.noise_mode)
    save_png(args.out, to_uint8(img)[0].cpu().numpy())
    source = args.checkpoint or f"random {G.cfg.resolution}px generator (weights seed {args.random_weights_seed})"
    print(f"wrote {args.out} ({G.cfg.resolution}x{G.cfg.resolution}, seed {args.seed}, {source})")


def cmd_track(args) -> None:
    from pvp.tracking.align import write_aligned_frames
    from pvp.tracking.track import Track
    from pvp.tracking.tracker import TrackSettings, track_video

    settings = TrackSettings(start=args.start, end=args.end, stride=args.stride, sigma_centre=args.sigma_centre,
                             sigma_axes=args.sigma_axes, crop_scale=args.crop_scale)
    face_model = Track.load(args.expression_space).face_model if args.expression_space else None
    if args.backend == "deca":
        from pvp.tracking.deca_backend import track_video_deca

        track = track_video_deca(args.video, settings, device=_device(args.device))
    else:
        track = track_video(args.video, settings, face_model=face_model)
    track.save(args.output)
    print(f"wrote {args.output}: {len(track)} frames, {int(track.valid.sum())} with a face, "
          f"{track.expression.shape[1]} expression coefficients ({track.backend})")
    for event in track.events:
        print(f"  note: {event['type']} in {len(event['frames'])} frames: {event['frames'][:20]}")
    if args.aligned:
        n = write_aligned_frames(track, args.aligned, args.size)
        print(f"wrote {n} aligned {args.size}px frames to {args.aligned}")


def _preset_overrides(preset, items):
    from pvp.fit.presets import apply_settings

    try:
        return apply_settings(preset, items)
    except ValueError as e:
        raise UserError(f"--set {e}") from None


def cmd_fit(args) -> None:
    from pvp.fit.pipeline import FitInputs, FitJob
    from pvp.fit.pivots import PIVOT_METHODS
    from pvp.fit.presets import PRESETS

    preset = _preset_overrides(PRESETS[args.preset], args.set)
    pivots = args.pivots or preset.pivot_selection
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed {args.seed}: expected 0 to {2**32 - 1}")
    if pivots not in PIVOT_METHODS:
        raise UserError(f"--pivots {pivots!r}: expected one of {', '.join(PIVOT_METHODS)}")
    for flag in ("prior", "e4e", "arcface", "vgg", "deca"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise UserError(f"--{flag} {path}: no such file")
    inputs = dict(source=args.source, avatar=args.output, preset=preset, prior=args.prior, e4e=args.e4e,
                  arcface=args.arcface, vgg=args.vgg, deca=args.deca, train_frames=args.train_frames,
                  pivot_method=pivots, resume=args.resume, seed=args.seed)
    if args.cluster:  # one task on the cluster, one GPU (its device is chosen there)
        from pvp.serve import cluster

        with cluster.connected(args.cluster):
            metrics = cluster.remote_call(cluster.fit_on_worker, inputs, args.device)
    else:
        metrics = FitJob(FitInputs(**inputs, device=_device(args.device))).run()
    print(f"fit {args.output}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in metrics.items() if not isinstance(v, dict)))


def cmd_avatar_random(args) -> None:
    from pvp.avatar import random_avatar

    avatar = random_avatar(args.resolution, args.expression_dim, seed=args.seed)
    if args.face_model_from:
        from pvp.tracking.track import Track

        avatar.face_model = Track.load(args.face_model_from).face_model
        if avatar.face_model is None or len(avatar.face_model.scales) < args.expression_dim:
            raise UserError(f"{args.face_model_from}: no face model with {args.expression_dim} expression components")
    avatar.save(args.output)
    print(f"wrote a random {args.resolution}px avatar to {args.output} ({avatar.num_channels} controls)")


def cmd_expression_map(args) -> None:
    import numpy as np

    from pvp.expression_map import fit_flame_map

    fitted = fit_flame_map(args.avatar, args.flame, args.track, args.frame_offset)
    print(f"expression map from {args.flame.name} stored in {args.avatar / 'avatar.json'}: {fitted['frames']} shared "
          f"frames, median R² {np.median(fitted['r2']):.2f} over {len(fitted['r2'])} expression channels")
    if np.median(fitted["r2"]) < 0.5:
        print("warning: the FLAME codes explain the avatar's expressions poorly; check that both tracks number the "
              "same video frames (--frame-offset; EMOCA counts from 1)", file=sys.stderr)


def cmd_edits(args) -> None:
    from pvp.avatar import Avatar
    from pvp.edits import add_edit, discover, load_direction

    if args.edits_command == "list":
        meta = Avatar.load(args.avatar).meta
        for e in meta.edits:
            print(f"{e['name']}\t{e['kind']}\t{e['source']}")
        if not meta.edits:
            print("no edit directions (add one with pvp edits add, or pvp edits discover)")
        return
    if args.edits_command == "add":
        avatar = Avatar.load(args.avatar)
        direction = load_direction(args.file, avatar.mappers.cfg.num_ws, avatar.mappers.cfg.w_dim,
                                   component=args.component, layers=args.layers) * args.scale
        add_edit(args.avatar, args.name, direction, "file", str(args.file))
        print(f"added edit {args.name!r} to {args.avatar}")
        return
    avatar = Avatar.load(args.avatar)
    found = discover(avatar, args.count)
    for name, direction in found:
        add_edit(args.avatar, name, direction, "discovered", "principal direction of the avatar's latents")
    print(f"added {len(found)} discovered directions to {args.avatar}: {', '.join(n for n, _ in found)}")


def cmd_serve(args) -> None:
    import torch

    from pvp.avatar import Avatar
    from pvp.serve.render_service import RenderService
    from pvp.serve.server import CurveConfig, Server, ServerConfigError

    device = _device(args.device)
    dtype = torch.float32
    if args.half:
        if device.type != "cuda":
            raise UserError("--half needs --device cuda (half precision is for GPUs)")
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    curve = None
    if args.curve_secret or args.clients:
        if not (args.curve_secret and args.clients):
            raise UserError("CURVE needs both --curve-secret (the server's key pair) and --clients (accepted keys)")
        curve = CurveConfig(args.curve_secret, args.clients)
    service = RenderService(Avatar.load(args.avatar, device), dtype=dtype, max_batch=args.max_batch)
    try:
        server = Server(service, args.bind, curve, batch_window_s=args.batch_window_ms / 1000)
    except ServerConfigError as e:
        raise UserError(str(e)) from None
    service.warm_up()
    print(f"pvp serve: {service.avatar.meta.name} ({service.avatar.meta.resolution}px, {device}) on "
          f"{server.endpoint}", flush=True)
    server.serve_forever()


def cmd_keys(args) -> None:
    import zmq.auth

    args.directory.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)  # the secret key is never readable by others, not even for a moment
    try:
        public, secret = zmq.auth.create_certificates(str(args.directory), args.name)
    finally:
        os.umask(old_umask)
    os.chmod(public, 0o644)  # the public key is meant to be handed out
    print(f"wrote {public} (public: give it to the other side) and {secret} (secret: keep it)")


def cmd_render(args) -> None:
    if args.timeline is not None and args.output.suffix.lower() in (".mp4", ".avi", ".mov"):
        raise UserError(f"-o {args.output}: a timeline renders into a folder of PNGs")
    if args.cluster is None:
        return _render(args, _device(args.device))
    from pvp.serve import cluster

    with cluster.connected(args.cluster):  # a bad address fails here, before any work
        _render(args, args.device)  # each worker chooses its device


def _render(args, device) -> None:
    from pvp.serve.batch_render import render_shots, render_track, timeline_shots

    if args.timeline is not None:
        shots = timeline_shots(args.avatar, args.timeline, args.output)
        n = render_shots(shots, device, args.batch, cluster=args.cluster, workers=args.workers)
        print(f"rendered {n} frames ({sum(len(s.frames) for s in shots)} in the timeline) to {args.output}")
        return
    n = render_track(args.avatar, args.track, args.output, normalize=args.normalize, device=device,
                     size=args.size, batch=args.batch, fps=args.fps, cluster=args.cluster, workers=args.workers)
    print(f"rendered {n} frames to {args.output}")


def cmd_eval(args) -> None:
    import json

    from pvp.evaluation.evaluate import evaluate, write_outputs

    result = evaluate(args.avatar, args.video, args.frames, args.mask, args.vgg, args.alex, _device(args.device))
    paths = write_outputs(result, args.output or args.avatar / "eval")
    from pvp.evaluation.report import console_lines

    print(f"{len(result.eval_set.frame_index)} frames of {args.video}; LPIPS: {result.lpips}")
    print("\n".join(console_lines(json.loads(paths["summary"].read_text()))))
    for what, path in paths.items():
        print(f"{what}: {path}")


def cmd_demo(args) -> None:
    from pvp.demo.run import DemoSettings, demo_schedule, run_demo
    from pvp.fit.presets import PRESETS

    preset = PRESETS[args.preset] if args.full else demo_schedule(PRESETS[args.preset])
    settings = DemoSettings(args.out, args.video, args.frames, preset=_preset_overrides(preset, args.set))
    summary = run_demo(settings)
    print(f"\npvp demo finished. Face found on {summary['face_found']:.0%} of the input frames.")
    for what in ("input", "avatar", "out_mp4", "frames", "blend", "report"):
        print(f"  {what:<8} {summary[what]}")
    print("  times    " + ", ".join(f"{k}: {v:.0f} s" for k, v in summary["seconds"].items()))
    print(f"  total    {sum(summary['seconds'].values()) / 60:.1f} min")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pvp", description=__doc__)
    p.add_argument("--version", action="version", version=f"pvp {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="render one image from a StyleGAN2 checkpoint and a seed")
    g.add_argument("--checkpoint", type=Path, help=".pkl (NVlabs), .pt (rosinality) or .safetensors (pvp); "
                   "without it, a small random generator")
    g.add_argument("--seed", type=int, default=0, help="z = np.random.RandomState(seed).randn(1, z_dim)")
    g.add_argument("--truncation", type=float, default=1.0, help="truncation psi (1 = none)")
    g.add_argument("--noise-mode", choices=("const", "random", "none"), default="const")
    g.add_argument("--out", type=Path, required=True, help="PNG file to write")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--resolution", type=int, default=256, help="random generator only")
    g.add_argument("--random-weights-seed", type=int, default=0, help="random generator only")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("track", help="track a face through a video: pose, jaw, expression, FFHQ crop")
    t.add_argument("video", type=Path, help="video file (mp4, mov, avi, webm, ...) or a folder of images")
    t.add_argument("-o", "--output", type=Path, required=True, help="track file to write (.safetensors)")
    t.add_argument("--start", type=int, default=0, help="first frame")
    t.add_argument("--end", type=int, default=None, help="stop before this frame")
    t.add_argument("--stride", type=int, default=1, help="take every Nth frame")
    t.add_argument("--backend", choices=("mediapipe", "deca"), default="mediapipe")
    t.add_argument("--expression-space", type=Path, help="express this (driving) video in another track's "
                   "expression space")
    t.add_argument("--aligned", type=Path, help="also write FFHQ-aligned frames to this folder")
    t.add_argument("--size", type=int, default=512, choices=(256, 512, 1024), help="aligned frame size")
    t.add_argument("--sigma-centre", type=float, default=1.0, help="temporal smoothing of the crop centre (frames)")
    t.add_argument("--sigma-axes", type=float, default=3.0, help="temporal smoothing of the crop axes (frames)")
    t.add_argument("--crop-scale", choices=("head", "ffhq"), default="head",
                   help="the crop's size: the head's rigid scale (an opening mouth does not zoom) or FFHQ's per-frame "
                        "recipe (default head)")
    t.add_argument("--device", default="auto", help="DECA backend only")
    t.set_defaults(func=cmd_track)

    f = sub.add_parser("fit", help="fit an avatar to a portrait video (personalized prior, then mappers)")
    f.add_argument("source", type=Path, help="video, folder of images, or a track file from pvp track")
    f.add_argument("-o", "--output", type=Path, required=True, help="avatar directory")
    f.add_argument("--preset", choices=("tiny", "small", "paper", "paper-exact"), default="tiny",
                   help="paper: the paper's objective in batches, a tenth of the optimiser steps; paper-exact: the "
                   "authors' schedule step for step")
    f.add_argument("--prior", type=Path, help="pretrained StyleGAN2: ffhq.pkl or stylegan2-ffhq-config-f.pt")
    f.add_argument("--e4e", type=Path, help="e4e_ffhq_encode.pt: encode the pivots instead of optimising")
    f.add_argument("--arcface", type=Path, help="model_ir_se50.pth for the identity loss")
    f.add_argument("--vgg", type=Path, help="vgg16-397923af.pth, the backbone of the LPIPS loss")
    f.add_argument("--deca", type=Path, help="deca_model.tar: a DECA track's pose and expression terms read the "
                   "renders with DECA (as the authors)")
    f.add_argument("--train-frames", help="A:B, the track frames to train on (default all)")
    f.add_argument("--pivots", help="pivot selection: kmeans (the authors'), kmeans-nearest or uniform "
                   "(default: the preset's)")
    f.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a preset field (repeatable); nested ones as objective.novel_pose=0, "
                   "mapper_design.hull=eq6, objective.optimize_noise=false")
    f.add_argument("--resume", action="store_true", help="continue an interrupted fit in the same directory")
    f.add_argument("--seed", type=int, default=0, help="seeds the random initialisations and batches (default 0): "
                   "another seed, another fit of the same video")
    f.add_argument("--device", default="auto")
    f.add_argument("--cluster", metavar="ADDRESS", help="run the fit as a job on Ray (one GPU; local, auto or "
                   "ray://HOST:PORT, docs/cluster.md); paths must be the same on the workers")
    f.set_defaults(func=cmd_fit)

    a = sub.add_parser("avatar", help="avatar utilities").add_subparsers(dest="avatar_command", required=True)
    r = a.add_parser("random", help="write a tiny random but complete avatar (for tests and development)")
    r.add_argument("-o", "--output", type=Path, required=True)
    r.add_argument("--resolution", type=int, default=64)
    r.add_argument("--expression-dim", type=int, default=8)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--face-model-from", type=Path, metavar="TRACK",
                   help="give the avatar this pvp track's face model (a face mesh for Blender rigs)")
    r.set_defaults(func=cmd_avatar_random)

    sv = sub.add_parser("serve", help="serve an avatar over ZeroMQ (protocol v1, docs/protocol.md)")
    sv.add_argument("avatar", type=Path)
    sv.add_argument("--bind", default="tcp://127.0.0.1:5555", help="endpoint; non-loopback addresses need CURVE")
    sv.add_argument("--device", default="auto")
    sv.add_argument("--half", action="store_true", help="bf16 (or fp16) synthesis on CUDA")
    sv.add_argument("--max-batch", type=positive_int, default=16, help="most frames rendered together")
    sv.add_argument("--batch-window-ms", type=float, default=0.0,
                    help="extra wait for more live requests before rendering (requests that arrive while a batch "
                         "renders are batched anyway)")
    sv.add_argument("--curve-secret", type=Path, help="the server's .key_secret (pvp keys)")
    sv.add_argument("--clients", type=Path, help="folder of accepted clients' .key files")
    sv.set_defaults(func=cmd_serve)

    k = sub.add_parser("keys", help="make a CURVE key pair (NAME.key public, NAME.key_secret secret)")
    k.add_argument("directory", type=Path)
    k.add_argument("name")
    k.set_defaults(func=cmd_keys)

    rd = sub.add_parser("render", help="render a whole track through an avatar (video or PNG folder)")
    rd.add_argument("avatar", type=Path)
    src = rd.add_mutually_exclusive_group(required=True)
    src.add_argument("--track", type=Path, help="a pvp track (the avatar's video or a driving one)")
    src.add_argument("--timeline", type=Path, help="a timeline file (frames, controls, edits) the Blender "
                     "extension writes for a cluster render")
    rd.add_argument("-o", "--output", type=Path, required=True, help="OUT.mp4 or a folder of PNGs")
    rd.add_argument("--normalize", choices=("auto", "on", "off"), default="auto",
                    help="renormalise a driving track's jaw/expression statistics to the avatar's (auto: when "
                         "the track is not the avatar's own video)")
    rd.add_argument("--size", type=int, help="output size (default: the avatar's resolution)")
    rd.add_argument("--batch", type=positive_int, default=16, help="frames rendered together (a cluster hands "
                    "out work in chunks of one batch)")
    rd.add_argument("--fps", type=float, help="video frame rate (default: the track's)")
    rd.add_argument("--device", default="auto")
    rd.add_argument("--cluster", metavar="ADDRESS", help="render on Ray: local (started here), auto (the cluster "
                    "this machine is part of, else local) or ray://HOST:PORT (docs/cluster.md)")
    rd.add_argument("--workers", type=positive_int, help="renderers on the cluster (default: one per GPU, or per "
                    "CPU on a cluster without GPUs)")
    rd.set_defaults(func=cmd_render)

    ev = sub.add_parser("eval", help="PSNR/SSIM/LPIPS and control accuracy of an avatar on held-out frames, "
                                     "against nearest-pivot and nearest-frame baselines; CSV + report.html")
    ev.add_argument("avatar", type=Path)
    ev.add_argument("--video", type=Path, required=True)
    ev.add_argument("--frames", help="A:B, the frames to evaluate (the paper: a later part of the video)")
    ev.add_argument("--mask", choices=("face",), help="measure inside the face (landmarks' convex hull)")
    ev.add_argument("--vgg", type=Path, help="vgg16-397923af.pth: LPIPS (VGG)")
    ev.add_argument("--alex", type=Path, help="alexnet-owt-7be5be79.pth: LPIPS (Alex)")
    ev.add_argument("-o", "--output", type=Path, help="output folder (default AVATAR/eval)")
    ev.add_argument("--device", default="auto")
    ev.set_defaults(func=cmd_eval)

    dm = sub.add_parser("demo", help="the whole product on its embedded defaults: synthetic clip (Blender), fit, "
                                     "server, Blender rig + driving keyframes + timeline render, report")
    dm.add_argument("--video", type=Path, help="a portrait video instead of the synthetic clip")
    dm.add_argument("--out", type=Path, default=Path("demo"))
    dm.add_argument("--frames", type=int, default=240, help="length of the synthetic clip")
    dm.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    dm.add_argument("--full", action="store_true",
                    help="train the preset's whole schedule, three times the demo's steps (about three times as "
                         "long), rather than a third of it")
    dm.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a preset field (repeatable)")
    dm.set_defaults(func=cmd_demo)

    xm = sub.add_parser("expression-map", help="let FLAME expression codes (DECA, EMOCA, NHA, metrical-tracker) "
                                               "drive the avatar: fit a map on its own video tracked by that tool")
    xm.add_argument("avatar", type=Path)
    xm.add_argument("flame", type=Path, help="the FLAME tracker's output for the avatar's own video")
    xm.add_argument("--track", type=Path, help="the avatar's pvp track (default AVATAR/work/track.safetensors)")
    xm.add_argument("--frame-offset", type=int, default=0,
                    help="added to the FLAME file's frame numbers to give the video's 0-based ones (EMOCA: -1)")
    xm.set_defaults(func=cmd_expression_map)

    e = sub.add_parser("edits", help="appearance edit directions of an avatar")
    es = e.add_subparsers(dest="edits_command", required=True)
    el = es.add_parser("list", help="list an avatar's edit directions")
    el.add_argument("avatar", type=Path)
    ea = es.add_parser("add", help="add a direction: InterFaceGAN .npy/.pt, GANSpace ffhq_pca.pt")
    ea.add_argument("avatar", type=Path)
    ea.add_argument("name")
    ea.add_argument("file", type=Path)
    ea.add_argument("--component", type=int, help="GANSpace component")
    ea.add_argument("--layers", help="A:B, the W+ layers the direction acts on (default all)")
    ea.add_argument("--scale", type=float, default=1.0, help="scale of one unit of strength")
    ed = es.add_parser("discover", help="add principal directions of the avatar's own latent space")
    ed.add_argument("avatar", type=Path)
    ed.add_argument("--count", type=int, default=8)
    for sp in (el, ea, ed):
        sp.set_defaults(func=cmd_edits)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    from pvp.avatar import AvatarError
    from pvp.checkpoints import CheckpointError
    from pvp.demo.run import DemoError
    from pvp.edits import EditError
    from pvp.evaluation.evaluate import EvalError
    from pvp.fit.pipeline import FitError
    from pvp.models.losses import MissingWeights
    from pvp.serve.cluster import ClusterError
    from pvp.tracking.track import TrackError
    from pvp.video import VideoError
    from pvp_contract.driving import DrivingError

    try:
        args.func(args)
    except (UserError, CheckpointError, VideoError, TrackError, FitError, MissingWeights,
            AvatarError, EditError, EvalError, DemoError, DrivingError, ClusterError, FileNotFoundError) as e:
        print(f"pvp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pvp {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
