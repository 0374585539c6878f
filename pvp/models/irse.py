"""IR-SE ResNet blocks (InsightFace's IR-SE50), shared by the e4e encoder and the ArcFace identity network.
Module names follow TreB1eN/InsightFace_Pytorch and pSp/e4e so that their official files load directly."""
from __future__ import annotations

from torch import nn

# (in_channel, depth, number of units) of the four stages of IR-50; the first unit of each stage strides 2.
IR50_STAGES = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))


class SEModule(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class BottleneckIRSE(nn.Module):
    def __init__(self, in_channel: int, depth: int, stride: int):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channel, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel), nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth), SEModule(depth, 16))

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


def ir_se50_body() -> nn.Sequential:
    units = []
    for in_ch, depth, n in IR50_STAGES:
        units.append(BottleneckIRSE(in_ch, depth, 2))
        units += [BottleneckIRSE(depth, depth, 1) for _ in range(n - 1)]
    return nn.Sequential(*units)


def input_layer() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))


def read_weights(path, what: str, where: str) -> dict:
    """torch.load(weights_only) of a weight file the user gives, with errors that name it."""
    from pathlib import Path

    import torch

    from pvp.checkpoints.layout import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; {where}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated or unsafe
        raise CheckpointError(f"{path}: not a readable {what} checkpoint ({e})") from None


def load_checked(module: nn.Module, state: dict, source: str, what: str) -> None:
    """load_state_dict that names every missing, unexpected and mis-shaped key of a weight file."""
    from pvp.checkpoints.layout import check_shapes

    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_shapes({k: tuple(v.shape) for k, v in state.items()}, expected, source, what)
    module.load_state_dict(state, strict=True)
