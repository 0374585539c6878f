"""Parity with the authors' code: their ExprAlphaV2 (ken2576/pvp, models/latent_module.py, imported as
published from a checkout) beside pvp's mappers and objective with the `paper` preset's design, the same
weights and the same random inputs. Prints the largest differences of the hull weights, the expression
offsets, w_final and the locality term (their manifold loss: mean(dw^2) of the normal and the perturbed
render) and writes bench/results/parity.json.

    pip install einops   # the one import of latent_module.py that pvp does not have
    python bench/parity.py --authors PATH/TO/ken2576-pvp [--pivots 200] [--batch 16]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import print_table, write_results  # noqa: E402
from pvp.fit.mapper_training import MapperData, MapperObjective  # noqa: E402
from pvp.fit.presets import PRESETS  # noqa: E402
from pvp.models.losses import PerceptualLoss  # noqa: E402
from pvp.models.mappers import MapperConfig, Mappers  # noqa: E402

NUM_WS, W_DIM, JAW_EXPRESSION = 18, 512, 53  # FFHQ 1024; jaw axis-angle + DECA's 50


def authors_latent_module(checkout: Path):
    """models/latent_module.py, its `utils.model_utils` import served from the checkout's file without the
    training stack utils/__init__.py pulls in (lightning, omegaconf)."""
    spec = importlib.util.spec_from_file_location("utils.model_utils", checkout / "utils" / "model_utils.py")
    model_utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_utils)
    sys.modules["utils"] = types.SimpleNamespace(model_utils=model_utils)
    sys.modules["utils.model_utils"] = model_utils
    spec = importlib.util.spec_from_file_location("latent_module", checkout / "models" / "latent_module.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # the W statistics need a whole StyleGAN; ExprAlphaV2 only keeps them as unused buffers
    module.compute_w_stats = lambda *a, **k: (torch.zeros(1, 1, W_DIM), torch.ones(1, 1, W_DIM))
    return module


class FrozenRenderer(torch.nn.Module):
    """A stand-in generator for the objective's locality term (which never looks at pixels)."""

    num_ws = NUM_WS

    def synthesis(self, w, noise_mode="const", dtype=None):  # renders in float32 whatever is asked
        return w[:, :3, :256].reshape(len(w), 3, 16, 16).tanh()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--authors", type=Path, required=True, help="a checkout of github.com/ken2576/pvp")
    ap.add_argument("--pivots", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    authors = authors_latent_module(args.authors)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as anchors:
        for i in range(args.pivots):
            (Path(anchors) / f"{i:03d}").mkdir()
            torch.save(torch.randn(1, NUM_WS, W_DIM), Path(anchors) / f"{i:03d}" / "0.pt")
        theirs = authors.ExprAlphaV2(types.SimpleNamespace(num_ws=NUM_WS), anchors, "cpu", beta=0.02,
                                     input_size=JAW_EXPRESSION, hidden_size=128, latent_size=W_DIM, layer_count=2,
                                     mod_style_count=8)
    # trained-looking weights: blends well off the centroid, offsets inside tanh's range
    for p in theirs.alpha_net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    for p in theirs.expr_net.parameters():
        torch.nn.init.normal_(p, std=0.03)
    design = PRESETS["paper"].mapper_design
    cfg = MapperConfig(num_pivots=args.pivots, num_ws=NUM_WS, w_dim=W_DIM, jaw_expression_dim=JAW_EXPRESSION,
                       design=design)
    ours = Mappers(cfg, theirs.all_anchors.clone())
    copy = [(theirs.alpha_net, ours.pose.net), *zip(theirs.expr_net, ours.expression.nets)]
    with torch.no_grad():
        for src, dst in copy:
            for i in (0, 2):
                dst[i].weight.copy_(src[i].weight)
                dst[i].bias.copy_(src[i].bias)

    n = args.batch
    pitch, yaw = torch.randn(n, 1) * 0.3, torch.randn(n, 1) * 0.5
    jaw_expression = torch.cat([torch.rand(n, 1) * 0.3, torch.randn(n, 2) * 0.05, torch.randn(n, 50)], 1)
    data = MapperData(torch.cat([pitch, yaw], 1), jaw_expression, torch.zeros(n, 3, 16, 16), torch.ones(n, 1, 16, 16),
                      jaw_expression.min(0).values, jaw_expression.max(0).values)
    objective = MapperObjective(FrozenRenderer(), data, PerceptualLoss("msssim"), PRESETS["paper"].objective)
    perturbed = objective.perturbed(jaw_expression, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ws, delta, alpha = theirs.generate(jaw_expression, pitch, yaw, return_alpha=True)
        _, delta_perturbed = theirs.generate(perturbed, pitch, yaw)
        manifold = torch.mean(delta**2) + torch.mean(delta_perturbed**2)  # their calculate_loss
        w_final, dw = ours(torch.cat([pitch, yaw], 1), jaw_expression)
        # the objective's own locality: its perturbation drawn again from the same seed
        gen = torch.Generator().manual_seed(1)
        objective.perturbed = lambda je, _gen: perturbed
        locality = objective.terms(ours, torch.arange(n), gen)["locality"]
        weights = ours.pose.weights(torch.cat([pitch, yaw], 1))
    rows = [
        {"quantity": "hull weights", "max_abs_diff": (weights - alpha).abs().max(), "scale": alpha.abs().max(),
         "min_weight": alpha.min()},
        {"quantity": "expression offsets (layers 0-7)", "max_abs_diff": (dw[:, :8] - delta).abs().max(),
         "scale": delta.abs().max()},
        {"quantity": "w_final", "max_abs_diff": (w_final - ws[:, 0]).abs().max(), "scale": ws.abs().max()},
        {"quantity": "locality term", "max_abs_diff": (locality - manifold).abs(), "scale": manifold},
    ]
    rows = [{k: (float(v) if torch.is_tensor(v) else v) for k, v in r.items()} for r in rows]
    for r in rows:
        r["within_1e-4"] = r["max_abs_diff"] < 1e-4
    print_table(rows, ["quantity", "max_abs_diff", "scale", "min_weight", "within_1e-4"])
    write_results("parity", "CPU", rows)
    if not all(r["within_1e-4"] for r in rows):
        sys.exit("bench/parity.py: pvp's paper preset differs from the authors' code")


if __name__ == "__main__":
    main()
