"""Writers of checkpoint files in the official layouts, written from the reference code's structure
(rosinality/stylegan2-pytorch model.py, NVlabs stylegan2-ada-pytorch networks.py + persistence.py)
independently of the loaders under test, so a wrong key map in pvp cannot agree with itself."""
from __future__ import annotations

import contextlib
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
import torch

from pvp.models.generator import Generator, GeneratorConfig

FILTER = torch.tensor([1.0, 3.0, 3.0, 1.0])
FILTER_2D = (FILTER[:, None] * FILTER[None, :]) / 64.0


def random_generator(resolution=32, channels=None, w_dim=32, mapping_layers=8, seed=0, **kw) -> Generator:
    """Small generator with every tensor random (noise strengths and biases included)."""
    torch.manual_seed(seed)
    cfg = GeneratorConfig(resolution=resolution, channels=channels or (32,) * (GeneratorConfig(resolution).num_blocks),
                          z_dim=w_dim, w_dim=w_dim, mapping_layers=mapping_layers, **kw)
    G = Generator(cfg).eval().requires_grad_(False)
    for name, t in G.state_dict().items():
        if name.endswith(("bias", "noise_strength")):
            t.copy_(torch.randn_like(t) * 0.1 + (1.0 if "affine.bias" in name else 0.0))
        elif name.endswith("w_avg"):
            t.copy_(torch.randn_like(t))
    return G


# --- rosinality/stylegan2-pytorch -------------------------------------------------------------------

def random_lpips_vgg(device="cpu"):
    """LPIPS-VGG as the paper presets use it, its VGG random (no backbone file): a PerceptualLoss."""
    import warnings

    import lpips

    from pvp.models.losses import PerceptualLoss

    loss = PerceptualLoss("msssim")
    loss.kind = "lpips-vgg"
    with warnings.catch_warnings():  # lpips asks torchvision for VGG16 the pre-0.13 way
        warnings.simplefilter("ignore", UserWarning)
        loss.lpips = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval().requires_grad_(False)
    return loss.to(device)


def rosinality_checkpoint(G: Generator) -> dict:
    """{'g_ema': state_dict, 'latent_avg': [w_dim]} with rosinality's names, nesting and shapes."""
    sd, cfg = G.state_dict(), G.cfg
    g = OrderedDict()
    for i in range(cfg.mapping_layers):  # style.0 is PixelNorm (no tensors)
        g[f"style.{i + 1}.weight"] = sd[f"mapping.fc{i}.weight"]
        g[f"style.{i + 1}.bias"] = sd[f"mapping.fc{i}.bias"]
    g["input.input"] = sd["synthesis.b4.const"][None]

    def styled_conv(prefix, src, upsample):
        g[f"{prefix}.conv.weight"] = sd[f"{src}.weight"][None]  # [1, out, in, k, k]
        if upsample:
            g[f"{prefix}.conv.blur.kernel"] = FILTER_2D * 4  # make_kernel(...) * upsample_factor ** 2
        g[f"{prefix}.conv.modulation.weight"] = sd[f"{src}.affine.weight"]
        g[f"{prefix}.conv.modulation.bias"] = sd[f"{src}.affine.bias"]
        g[f"{prefix}.noise.weight"] = sd[f"{src}.noise_strength"].reshape(1)
        g[f"{prefix}.activate.bias"] = sd[f"{src}.bias"]

    def to_rgb(prefix, src, upsample):
        g[f"{prefix}.bias"] = sd[f"{src}.bias"].reshape(1, 3, 1, 1)
        if upsample:
            g[f"{prefix}.upsample.kernel"] = FILTER_2D * 4
        g[f"{prefix}.conv.weight"] = sd[f"{src}.weight"][None]
        g[f"{prefix}.conv.modulation.weight"] = sd[f"{src}.affine.weight"]
        g[f"{prefix}.conv.modulation.bias"] = sd[f"{src}.affine.bias"]

    styled_conv("conv1", "synthesis.b4.conv1", False)
    to_rgb("to_rgb1", "synthesis.b4.torgb", False)
    noise_sources = ["synthesis.b4.conv1"]
    for i, res in enumerate(cfg.block_resolutions[1:]):
        styled_conv(f"convs.{2 * i}", f"synthesis.b{res}.conv0", True)
        styled_conv(f"convs.{2 * i + 1}", f"synthesis.b{res}.conv1", False)
        to_rgb(f"to_rgbs.{i}", f"synthesis.b{res}.torgb", True)
        noise_sources += [f"synthesis.b{res}.conv0", f"synthesis.b{res}.conv1"]
    for j, src in enumerate(noise_sources):  # noise_j has shape [1, 1, 2**((j+5)//2), ...]
        g[f"noises.noise_{j}"] = sd[f"{src}.noise_const"][None, None]
    return {"g_ema": OrderedDict((k, v.clone()) for k, v in g.items()), "latent_avg": sd["mapping.w_avg"].clone()}


# --- NVlabs stylegan2-ada-pytorch ----------------------------------------------------------------------

MODULE_SRC = "import os\nos.environ['PVP_PICKLE_SOURCE_RAN'] = '1'\nclass Generator: pass\n"


def _persistence_stub():
    def _reconstruct_persistent_obj(meta):  # pragma: no cover - only its pickled name matters
        raise AssertionError("the writer never unpickles")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    pkg = types.ModuleType("torch_utils")
    mod = types.ModuleType("torch_utils.persistence")
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    return pkg, mod


class _Persistent:
    """Pickles exactly as a @persistent_class object: _reconstruct_persistent_obj(meta)."""

    def __init__(self, class_name, params=(), buffers=(), modules=(), **attrs):
        self.class_name = class_name
        self.state = dict(training=False, _parameters=OrderedDict(params), _buffers=OrderedDict(buffers),
                          _non_persistent_buffers_set=set(), _backward_hooks=OrderedDict(),
                          _forward_hooks=OrderedDict(), _forward_pre_hooks=OrderedDict(),
                          _state_dict_hooks=OrderedDict(), _load_state_dict_pre_hooks=OrderedDict(),
                          _modules=OrderedDict(modules), **attrs)

    def __reduce__(self):
        fn = sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj
        meta = dict(type="class", version=6, module_src=MODULE_SRC, class_name=self.class_name, state=self.state)
        return fn, (meta,)


def _p(t):
    return torch.nn.Parameter(t.clone(), requires_grad=False)


def _fc(sd, prefix, lr_multiplier=1.0, activation="linear"):
    w = sd[f"{prefix}.weight"]
    return _Persistent("FullyConnectedLayer", [("weight", _p(w)), ("bias", _p(sd[f"{prefix}.bias"]))],
                       activation=activation, weight_gain=np.float64(lr_multiplier / np.sqrt(w.shape[1])),
                       bias_gain=lr_multiplier)


def _layer(sd, prefix, res, up, conv_clamp):
    return _Persistent(
        "SynthesisLayer",
        [("weight", _p(sd[f"{prefix}.weight"])), ("noise_strength", _p(sd[f"{prefix}.noise_strength"])),
         ("bias", _p(sd[f"{prefix}.bias"]))],
        [("resample_filter", FILTER_2D.clone()), ("noise_const", sd[f"{prefix}.noise_const"].clone())],
        [("affine", _fc(sd, f"{prefix}.affine"))],
        resolution=res, up=up, use_noise=True, activation="lrelu", conv_clamp=conv_clamp, padding=1,
        act_gain=np.float64(np.sqrt(2)))


def nvlabs_pickle_dict(G: Generator) -> dict:
    """The dict NVlabs' training loop pickles: G, D, G_ema, augment_pipe, training_set_kwargs."""
    sd, cfg = G.state_dict(), G.cfg
    clamp = cfg.conv_clamp
    blocks, prev = [], 0
    fp16_from = max(2 ** (int(np.log2(cfg.resolution)) + 1 - cfg.num_fp16_res), 8)
    for res, ch in zip(cfg.block_resolutions, cfg.channels):
        b = f"synthesis.b{res}"
        params = [("const", _p(sd[f"{b}.const"]))] if prev == 0 else []
        mods = [] if prev == 0 else [("conv0", _layer(sd, f"{b}.conv0", res, 2, clamp))]
        mods += [("conv1", _layer(sd, f"{b}.conv1", res, 1, clamp)),
                 ("torgb", _Persistent("ToRGBLayer", [("weight", _p(sd[f"{b}.torgb.weight"])),
                                                      ("bias", _p(sd[f"{b}.torgb.bias"]))], [],
                                       [("affine", _fc(sd, f"{b}.torgb.affine"))], conv_clamp=clamp,
                                       weight_gain=np.float64(1 / np.sqrt(ch))))]
        blocks.append((f"b{res}", _Persistent(
            "SynthesisBlock", params, [("resample_filter", FILTER_2D.clone())], mods, in_channels=prev, w_dim=cfg.w_dim,
            resolution=res, img_channels=3, is_last=res == cfg.resolution, architecture="skip",
            use_fp16=res >= fp16_from and cfg.num_fp16_res > 0, channels_last=False,
            num_conv=1 if prev == 0 else 2, num_torgb=1)))
        prev = ch
    synthesis = _Persistent("SynthesisNetwork", [], [], blocks, w_dim=cfg.w_dim, img_resolution=cfg.resolution,
                            img_resolution_log2=int(np.log2(cfg.resolution)), img_channels=3,
                            block_resolutions=list(cfg.block_resolutions), num_ws=cfg.num_ws)
    fcs = [(f"fc{i}", _fc(sd, f"mapping.fc{i}", cfg.mapping_lr_multiplier, "lrelu")) for i in range(cfg.mapping_layers)]
    mapping = _Persistent("MappingNetwork", [], [("w_avg", sd["mapping.w_avg"].clone())], fcs, z_dim=cfg.z_dim,
                          c_dim=0, w_dim=cfg.w_dim, num_ws=cfg.num_ws, num_layers=cfg.mapping_layers, w_avg_beta=0.995)
    init_kwargs = dict(z_dim=cfg.z_dim, c_dim=0, w_dim=cfg.w_dim, img_resolution=cfg.resolution, img_channels=3,
                       mapping_kwargs=dict(num_layers=cfg.mapping_layers),
                       synthesis_kwargs=dict(channel_base=cfg.channels[-1] * cfg.resolution,
                                             channel_max=max(cfg.channels), num_fp16_res=cfg.num_fp16_res,
                                             conv_clamp=clamp))
    g_ema = _Persistent("Generator", [], [], [("synthesis", synthesis), ("mapping", mapping)], z_dim=cfg.z_dim,
                        c_dim=0, w_dim=cfg.w_dim, img_resolution=cfg.resolution, img_channels=3, num_ws=cfg.num_ws,
                        _init_args=(), _init_kwargs=init_kwargs)
    return {"G": g_ema, "D": _Persistent("Discriminator"), "G_ema": g_ema, "augment_pipe": None,
            "training_set_kwargs": {"resolution": cfg.resolution}}


@contextlib.contextmanager
def _stub_modules():
    pkg, mod = _persistence_stub()
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules.update({"torch_utils": pkg, "torch_utils.persistence": mod})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def write_nvlabs_pkl(G: Generator, path, mutate=None, protocol=pickle.DEFAULT_PROTOCOL) -> None:
    data = nvlabs_pickle_dict(G)
    if mutate:
        mutate(data)
    with _stub_modules(), open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)


def write_rosinality_pt(G: Generator, path, mutate=None) -> None:
    ckpt = rosinality_checkpoint(G)
    if mutate:
        mutate(ckpt)
    torch.save(ckpt, path)


def state_of(record, *path):
    """Follow _modules names in a _Persistent tree (for tests that break one tensor)."""
    for name in path:
        record = record.state["_modules"][name]
    return record.state


def batch_norm_state(prefix, c, sd):
    sd.update({f"{prefix}.weight": torch.rand(c) + 0.5, f"{prefix}.bias": torch.randn(c) * 0.1,
               f"{prefix}.running_mean": torch.randn(c) * 0.1, f"{prefix}.running_var": torch.rand(c) + 0.5,
               f"{prefix}.num_batches_tracked": torch.tensor(1000)})


def official_e4e_state(num_ws=18):
    """An e4e Encoder4Editing state dict (pSp/e4e psp_encoders.py + helpers.py, IR-SE50 body), random."""
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return torch.randn(*shape, generator=g) * (2.0 / (shape[1] * (shape[2] if len(shape) > 2 else 1))) ** 0.5

    sd = {"input_layer.0.weight": w(64, 3, 3, 3), "input_layer.2.weight": torch.full((64,), 0.25)}
    batch_norm_state("input_layer.1", 64, sd)
    unit = 0
    for in_ch, depth, n in ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3)):  # get_blocks(50)
        for k in range(n):
            c_in = in_ch if k == 0 else depth
            p = f"body.{unit}"
            if c_in != depth:
                sd[f"{p}.shortcut_layer.0.weight"] = w(depth, c_in, 1, 1)
                batch_norm_state(f"{p}.shortcut_layer.1", depth, sd)
            batch_norm_state(f"{p}.res_layer.0", c_in, sd)
            sd[f"{p}.res_layer.1.weight"] = w(depth, c_in, 3, 3)
            sd[f"{p}.res_layer.2.weight"] = torch.full((depth,), 0.25)
            sd[f"{p}.res_layer.3.weight"] = w(depth, depth, 3, 3)
            batch_norm_state(f"{p}.res_layer.4", depth, sd)
            sd[f"{p}.res_layer.5.fc1.weight"] = w(depth // 16, depth, 1, 1)
            sd[f"{p}.res_layer.5.fc2.weight"] = w(depth, depth // 16, 1, 1)
            unit += 1
    for i in range(num_ws):
        spatial = 16 if i < 3 else 32 if i < 7 else 64
        for j in range({16: 4, 32: 5, 64: 6}[spatial]):
            sd[f"styles.{i}.convs.{2 * j}.weight"] = w(512, 512, 3, 3)
            sd[f"styles.{i}.convs.{2 * j}.bias"] = torch.zeros(512)
        sd[f"styles.{i}.linear.weight"] = torch.randn(512, 512, generator=g)
        sd[f"styles.{i}.linear.bias"] = torch.zeros(512)
    sd.update({"latlayer1.weight": w(512, 256, 1, 1), "latlayer1.bias": torch.zeros(512),
               "latlayer2.weight": w(512, 128, 1, 1), "latlayer2.bias": torch.zeros(512)})
    return sd


def write_deca_model(path, seed=0) -> dict:
    """DECA's deca_model.tar as torch.save writes it: {'E_flame', 'E_detail', 'D_detail'}, each a state dict.
    E_flame is DECA's ResnetEncoder: a ResNet-50 without its classifier under 'encoder.' (torchvision's key
    names) and the regressor 'layers.0' (2048 -> 1024) and 'layers.2' (1024 -> 236). Random values; the
    returned E_flame state is the one written."""
    import torchvision

    gen = torch.Generator().manual_seed(seed)
    resnet = torchvision.models.resnet50(weights=None).state_dict()
    e_flame = OrderedDict()
    for key, value in resnet.items():
        if key.startswith("fc."):
            continue
        if value.dtype.is_floating_point:
            value = torch.randn(value.shape, generator=gen) * 0.02 + (1.0 if key.endswith("running_var") else 0.0)
            value = value.abs() if key.endswith("running_var") else value
        e_flame[f"encoder.{key}"] = value
    for name, shape in (("layers.0", (1024, 2048)), ("layers.2", (236, 1024))):
        e_flame[f"{name}.weight"] = torch.randn(shape, generator=gen) * 0.02
        e_flame[f"{name}.bias"] = torch.randn(shape[0], generator=gen) * 0.02
    detail = OrderedDict(conv=torch.zeros(1))  # the detail networks are not read
    torch.save({"E_flame": e_flame, "E_detail": detail, "D_detail": detail}, path)
    return e_flame
