"""The ``pvp`` command. Each subcommand parses its arguments here and calls into a plain module."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__


class UserError(Exception):
    """Bad input from the user: printed as one clear line, no traceback."""


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def cmd_generate(args) -> None:
    import torch

    from .checkpoints import load_generator
    from .generator import Generator, GeneratorConfig, to_uint8, z_from_seed
    from .images import save_png

    device = _device(args.device)
    if args.checkpoint:
        G = load_generator(args.checkpoint, device=device)
    else:
        torch.manual_seed(args.random_weights_seed)
        cfg = GeneratorConfig(resolution=args.resolution, channels=(64,) * (GeneratorConfig(args.resolution).num_blocks),
                              z_dim=64, w_dim=64, mapping_layers=4)
        G = Generator(cfg).eval().requires_grad_(False).to(device)
        G.mapping.w_avg.copy_(G.estimate_w_avg())
    z = z_from_seed(args.seed, G.cfg.z_dim).to(device)
    with torch.no_grad():
        img = G(z, truncation_psi=args.truncation, noise_mode=args.noise_mode)
    save_png(args.out, to_uint8(img)[0].cpu().numpy())
    source = args.checkpoint or f"random {G.cfg.resolution}px generator (weights seed {args.random_weights_seed})"
    print(f"wrote {args.out} ({G.cfg.resolution}x{G.cfg.resolution}, seed {args.seed}, {source})")


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
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    from .checkpoints import CheckpointError

    try:
        args.func(args)
    except (UserError, CheckpointError, FileNotFoundError) as e:
        print(f"pvp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pvp {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
