"""ArcFace IR-SE50 (TreB1eN/InsightFace_Pytorch Backbone(112, 50, 'ir_se')) for the identity loss; loads
the official model_ir_se50.pth. Embeddings are L2-normalised 512-d vectors."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pvp.models.irse import input_layer, ir_se50_body, load_checked, read_weights

WHERE = "model_ir_se50.pth comes from TreB1eN/InsightFace_Pytorch (as pSp/e4e/PTI distribute it)"


class ArcFace(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layer = input_layer()
        self.body = ir_se50_body()
        self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(0.4), nn.Flatten(),
                                          nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, 112, 112] in [-1, 1] -> [B, 512] unit vectors."""
        return F.normalize(self.output_layer(self.body(self.input_layer(x))), dim=1)


def load_arcface(path, device="cpu") -> ArcFace:
    state = read_weights(path, "ArcFace", WHERE)
    net = ArcFace()
    load_checked(net, state, str(path), "an ArcFace IR-SE50 network")
    return net.eval().requires_grad_(False).to(device)


class IdentityLoss(nn.Module):
    """1 - cos(ArcFace(render), ArcFace(target)) on the face region of an FFHQ-aligned crop: PVP's crop
    [13:441, 44:472] of the 512 image (scaled to the input size), pooled to 112."""

    CROP_512 = (13, 441, 44, 472)

    def __init__(self, arcface: ArcFace):
        super().__init__()
        self.net = arcface

    def embed(self, img: torch.Tensor) -> torch.Tensor:
        s = img.shape[-1] / 512
        t, b, l, r = (round(v * s) for v in self.CROP_512)
        face = img[:, :, t:b, l:r]
        return self.net(F.interpolate(face, size=(112, 112), mode="bilinear", antialias=True, align_corners=False))

    def forward(self, render: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref = self.embed(target)
        return 1 - (self.embed(render) * ref).sum(1)
