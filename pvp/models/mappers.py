"""The pose and expression mappers (paper 4.2, appendix B).

F_rot: (pitch, yaw) -> blend weights over the K pivots, inside the beta-dilated convex hull
P_beta = {sum_i a_i w_i : sum_i a_i = 1, a_i >= -beta} (Eq. 6-7). The MLP predicts residuals around the
centroid (1/K each); two ways to keep them in the hull (``MapperConfig.hull``):
  'authors'  the authors' code (ken2576/pvp ExprAlphaV2, as MyStyle): s = softplus(a + beta, 100) - beta,
             then s / sum(s). Dividing by the sum leaves weights at -beta / sum(s) or above: about -beta while
             the sum stays near 1, further below where it is small.
  'eq6'      the literal Eq. 6: shifted softplus normalised so that the weights sum to 1 and reach -beta.

F_expr: (jaw, expression) -> residuals of W+ layers 0..7 only, one MLP per layer (Eq. 8-9).

The defaults are the authors' (LeakyReLU slope 0.01, PyTorch's default initialisation of every layer,
raw radians in). ``Standardize`` holds optional input statistics (identity unless fitted): the CPU presets
fit them on the training frames, because in radians head pose spans a few tenths and jaw opening a few
hundredths, which leaves an MLP almost blind to them over a short schedule.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pvp_contract import controls

BETA = 0.02  # the authors' code (ken2576/pvp)
SOFTPLUS_SHARPNESS = 100.0
EXPR_LAYERS = 8
HULLS = ("authors", "eq6")
JAW_AXES = 3  # the expression mapper takes the jaw as a FLAME axis-angle (third axis 0)


@dataclass(frozen=True)
class MapperDesign:
    """Choices that change what the mappers compute; the defaults are the authors' code."""

    hull: str = "authors"  # or 'eq6' (module docstring)
    leaky_slope: float = 0.01  # nn.LeakyReLU's default, as the authors
    zero_init_output: bool = False  # True: the last layers start at zero (the mappers start at the centroid)
    neutral_pivots: bool = False  # True: each pivot enters the pose blend without its own expression (Mappers)

    def __post_init__(self):
        if self.hull not in HULLS:
            raise ValueError(f"hull {self.hull!r}: expected one of {', '.join(HULLS)}")


# what bundles written before the authors' formulas became the defaults computed
LEGACY_DESIGN = MapperDesign(hull="eq6", leaky_slope=0.2, zero_init_output=True)


@dataclass(frozen=True)
class MapperConfig:
    num_pivots: int
    num_ws: int
    w_dim: int
    jaw_expression_dim: int  # JAW_AXES + K expression coefficients: the expression mapper's input
    hidden: int = 128
    beta: float = BETA
    expr_layers: int = EXPR_LAYERS
    design: MapperDesign = MapperDesign()

    @property
    def expression_coefficients(self) -> int:
        """K, as the control schema counts it."""
        return self.jaw_expression_dim - JAW_AXES

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "MapperConfig":
        d = dict(d)
        if "expression_dim" in d:  # bundles written before the field was renamed
            d["jaw_expression_dim"] = d.pop("expression_dim")
        d["design"] = MapperDesign(**d["design"]) if "design" in d else LEGACY_DESIGN
        return cls(**d)


def mlp(in_dim: int, out_dim: int, cfg: MapperConfig) -> nn.Sequential:
    """Linear -> LeakyReLU -> Linear -> Tanh."""
    net = nn.Sequential(nn.Linear(in_dim, cfg.hidden), nn.LeakyReLU(cfg.design.leaky_slope),
                        nn.Linear(cfg.hidden, out_dim), nn.Tanh())
    if cfg.design.zero_init_output:
        nn.init.zeros_(net[2].weight)
        nn.init.zeros_(net[2].bias)
    return net


def hull_weights(residual: torch.Tensor, beta: float, hull: str = "authors") -> torch.Tensor:
    """Residuals [B, K] around the centroid -> blend weights summing to 1 (module docstring)."""
    k = residual.shape[-1]
    alpha = residual + 1.0 / k
    if hull == "authors":
        shifted = F.softplus(alpha + beta, beta=SOFTPLUS_SHARPNESS) - beta
        return shifted / shifted.sum(-1, keepdim=True)
    # >= 0, ~ alpha + beta; the epsilon keeps the sum positive when every weight is pushed to -beta
    shifted = F.softplus(alpha + beta, beta=SOFTPLUS_SHARPNESS) + 1e-12
    return shifted / shifted.sum(-1, keepdim=True) * (1 + k * beta) - beta


class Standardize(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def fit(self, x: torch.Tensor) -> None:
        """Mean and standard deviation of the rows of x; a constant column keeps scale 1."""
        std = x.std(0) if len(x) > 1 else torch.zeros_like(self.scale)
        self.mean.copy_(x.mean(0))
        self.scale.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


class PoseMapper(nn.Module):
    def __init__(self, cfg: MapperConfig, pivots: torch.Tensor):
        super().__init__()
        if pivots.shape != (cfg.num_pivots, cfg.num_ws, cfg.w_dim):
            raise ValueError(f"pivots must be [{cfg.num_pivots}, {cfg.num_ws}, {cfg.w_dim}], got {list(pivots.shape)}")
        self.cfg = cfg
        self.inputs = Standardize(2)
        self.net = mlp(2, cfg.num_pivots, cfg)
        self.register_buffer("pivots", pivots.float())

    def weights(self, pitch_yaw: torch.Tensor) -> torch.Tensor:
        return hull_weights(self.net(self.inputs(pitch_yaw)), self.cfg.beta, self.cfg.design.hull)

    def forward(self, pitch_yaw: torch.Tensor) -> torch.Tensor:
        """[B, 2] radians -> w_rot [B, num_ws, w_dim]."""
        return torch.einsum("bk,kld->bld", self.weights(pitch_yaw), self.pivots)


class ExpressionMapper(nn.Module):
    def __init__(self, cfg: MapperConfig):
        super().__init__()
        self.cfg = cfg
        self.inputs = Standardize(cfg.jaw_expression_dim)
        self.nets = nn.ModuleList(mlp(cfg.jaw_expression_dim, cfg.w_dim, cfg) for _ in range(cfg.expr_layers))

    def forward(self, jaw_expression: torch.Tensor) -> torch.Tensor:
        """[B, 3 + E] -> delta W+ [B, num_ws, w_dim], zero beyond the first expr_layers layers."""
        x = self.inputs(jaw_expression)
        deltas = torch.stack([net(x) for net in self.nets], 1)
        rest = deltas.new_zeros(deltas.shape[0], self.cfg.num_ws - self.cfg.expr_layers, self.cfg.w_dim)
        return torch.cat([deltas, rest], 1)


def mapper_inputs(ctrl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Controls [B, C] in the schema's order (degrees for head and jaw) -> the mappers' inputs:
    (pitch, yaw) [B, 2] and (jaw, expression) [B, JAW_AXES + K], angles in radians, the jaw's third axis 0."""
    pitch_yaw = torch.deg2rad(torch.stack([ctrl[:, controls.PITCH], ctrl[:, controls.YAW]], 1))
    jaw_open, jaw_lateral = ctrl[:, controls.JAW_OPEN], ctrl[:, controls.JAW_LATERAL]
    jaw = torch.deg2rad(torch.stack([jaw_open, jaw_lateral, torch.zeros_like(jaw_open)], 1))
    return pitch_yaw, torch.cat([jaw, ctrl[:, controls.EXPRESSION_COLUMNS]], 1)


class Mappers(nn.Module):
    """w_final = F_rot(pitch, yaw) + F_expr(jaw, expression).

    With ``design.neutral_pivots`` each pivot w_k enters the blend as w_k - F_expr(e_k), its own jaw and
    expression e_k (``pivot_jaw_expression``, [K, 3 + E] in the expression mapper's units) taken out. The pose
    mapper sees the head pose alone, so at a pose its blend averages the mouths of the pivots there, which an
    expression mapper that sees no pose cannot undo; neutral pivots leave the requested expression the only one in
    w_final: where the blend is one pivot and the request its own expression, w_final is that pivot (without
    neutral pivots, only as far as F_expr(e_k) is 0)."""

    def __init__(self, cfg: MapperConfig, pivots: torch.Tensor, pivot_jaw_expression: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.pose = PoseMapper(cfg, pivots)
        self.expression = ExpressionMapper(cfg)
        if pivot_jaw_expression is not None and not cfg.design.neutral_pivots:
            raise ValueError("the pivots' jaw and expression are for neutral pivots (mapper_design.neutral_pivots)")
        if cfg.design.neutral_pivots:
            shape = (cfg.num_pivots, cfg.jaw_expression_dim)
            if pivot_jaw_expression is None or tuple(pivot_jaw_expression.shape) != shape:
                got = None if pivot_jaw_expression is None else list(pivot_jaw_expression.shape)
                raise ValueError(f"neutral pivots need the pivots' jaw and expression {list(shape)}, got {got}")
            self.register_buffer("pivot_jaw_expression", pivot_jaw_expression.float())

    def blended_pivots(self) -> torch.Tensor:
        """[K, num_ws, w_dim]: the latents the pose mapper's weights blend."""
        if not self.cfg.design.neutral_pivots:
            return self.pose.pivots
        return self.pose.pivots - self.expression(self.pivot_jaw_expression)

    def forward(self, pitch_yaw: torch.Tensor, jaw_expression: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (w_final, its offset from the blend of the pivots as they are: delta_w_expr)."""
        delta = self.expression(jaw_expression)
        if not self.cfg.design.neutral_pivots:
            return self.pose(pitch_yaw) + delta, delta
        weights = self.pose.weights(pitch_yaw)
        w = torch.einsum("bk,kld->bld", weights, self.blended_pivots()) + delta
        return w, w - torch.einsum("bk,kld->bld", weights, self.pose.pivots)


def save_mappers(mappers: Mappers, path) -> None:
    """safetensors with the config in the metadata (atomic)."""
    from safetensors.torch import save_file

    from pvp_contract.atomic import atomic_path

    state = {k: v.detach().cpu().contiguous() for k, v in mappers.state_dict().items()}
    with atomic_path(Path(path)) as tmp:
        save_file(state, str(tmp), metadata={"config": json.dumps(mappers.cfg.to_json())})


class MapperFileError(ValueError):
    """A mapper file that cannot be loaded; the message names it."""


def load_mappers(path) -> Mappers:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            cfg = MapperConfig.from_json(json.loads((f.metadata() or {})["config"]))
        state = load_file(str(path))
        mappers = Mappers(cfg, state["pose.pivots"], state.get("pivot_jaw_expression"))
        mappers.load_state_dict(state, strict=True)
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise MapperFileError(f"{path}: not a readable pvp mapper file ({type(e).__name__}: {e})") from None
    return mappers
