"""Run a TFLite graph in PyTorch (differentiably), reading its weights with the ``tflite`` parser.

Covers the operators of MediaPipe's face-landmark network: CONV_2D, DEPTHWISE_CONV_2D, PRELU, ADD,
MAX_POOL_2D, PAD and DEQUANTIZE (fp16 weights). Activations are kept NCHW; TFLite's NHWC weights and
paddings are converted once at load time.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 4: np.int64}
_ACTIVATIONS = {0: lambda x: x, 1: F.relu, 3: lambda x: F.relu6(x)}


class UnsupportedGraph(ValueError):
    pass


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class TFLiteGraph(nn.Module):
    """forward(x NCHW float) -> list of outputs, NCHW (TFLite's [1, 1, 1, C] become [B, C, 1, 1]), computed
    channels-last."""

    def __init__(self, path: str | Path):
        super().__init__()
        import tflite

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such TFLite model")
        model = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
        graph = model.Subgraphs(0)
        names = {v: k for k, v in tflite.BuiltinOperator.__dict__.items() if not k.startswith("_")}
        self.input_index = int(graph.InputsAsNumpy()[0])
        self.output_indices = [int(i) for i in graph.OutputsAsNumpy()]
        self.input_shape = tuple(int(s) for s in graph.Tensors(self.input_index).ShapeAsNumpy())
        constants: dict[int, np.ndarray] = {}
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            data = model.Buffers(tensor.Buffer()).DataAsNumpy()
            if isinstance(data, np.ndarray) and data.size:
                constants[t] = data.view(_DTYPES[tensor.Type()]).reshape(tensor.ShapeAsNumpy())
        self.ops: list[tuple] = []
        for i in range(graph.OperatorsLength()):
            op = graph.Operators(i)
            code = model.OperatorCodes(op.OpcodeIndex())
            name = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
            ins, outs = [int(j) for j in op.InputsAsNumpy()], [int(j) for j in op.OutputsAsNumpy()]
            if name == "DEQUANTIZE":
                constants[outs[0]] = constants[ins[0]].astype(np.float32)
                continue
            self.ops.append(self._build(name, op, ins, outs[0], constants, graph, tflite))

    def _param(self, name: str, array: np.ndarray) -> str:
        key = f"w{len(self._buffers)}"
        value = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        self.register_buffer(key, value.contiguous(memory_format=torch.channels_last) if value.ndim == 4 else value)
        return key

    def _build(self, name, op, ins, out, constants, graph, tflite):
        shape_in = [int(s) for s in graph.Tensors(ins[0]).ShapeAsNumpy()]  # NHWC
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            opts_cls = tflite.Conv2DOptions if name == "CONV_2D" else tflite.DepthwiseConv2DOptions
            opts = opts_cls()
            opts.Init(op.BuiltinOptions().Bytes, op.BuiltinOptions().Pos)
            kernel = constants[ins[1]]
            if name == "CONV_2D":
                weight, groups = kernel.transpose(0, 3, 1, 2), 1  # OHWI -> OIHW
            else:
                weight, groups = kernel.transpose(3, 0, 1, 2), kernel.shape[3]  # 1HWO -> O1HW
                if opts.DepthMultiplier() not in (0, 1):
                    raise UnsupportedGraph("depthwise convolutions with a depth multiplier are not supported")
            stride = (opts.StrideH(), opts.StrideW())
            kh, kw = weight.shape[2:]
            pad = (0, 0, 0, 0)
            if opts.Padding() == tflite.Padding.SAME:
                ph, pw = _same_padding(shape_in[1], kh, stride[0]), _same_padding(shape_in[2], kw, stride[1])
                pad = (pw[0], pw[1], ph[0], ph[1])
            bias = self._param(name, constants[ins[2]]) if len(ins) > 2 and ins[2] >= 0 else None
            conv_padding = (0, 0)  # a symmetric padding rides in the convolution: no padded copy of the activations
            if pad[0] == pad[1] and pad[2] == pad[3]:
                pad, conv_padding = (0, 0, 0, 0), (pad[2], pad[0])
            return ("conv", ins[0], out, self._param(name, weight), bias, stride, pad, conv_padding, groups,
                    opts.FusedActivationFunction())
        if name == "PRELU":
            return ("prelu", ins[0], out, self._param(name, constants[ins[1]].reshape(-1)))
        if name == "ADD":
            opts = tflite.AddOptions()
            opts.Init(op.BuiltinOptions().Bytes, op.BuiltinOptions().Pos)
            return ("add", ins[0], out, ins[1], opts.FusedActivationFunction())
        if name == "MAX_POOL_2D":
            opts = tflite.Pool2DOptions()
            opts.Init(op.BuiltinOptions().Bytes, op.BuiltinOptions().Pos)
            k, s = (opts.FilterHeight(), opts.FilterWidth()), (opts.StrideH(), opts.StrideW())
            pad = (0, 0, 0, 0)
            if opts.Padding() == tflite.Padding.SAME:
                ph, pw = _same_padding(shape_in[1], k[0], s[0]), _same_padding(shape_in[2], k[1], s[1])
                pad = (pw[0], pw[1], ph[0], ph[1])
            return ("maxpool", ins[0], out, k, s, pad)
        if name == "PAD":
            p = constants[ins[1]]  # [[N0, N1], [H0, H1], [W0, W1], [C0, C1]]
            return ("pad", ins[0], out, (int(p[2, 0]), int(p[2, 1]), int(p[1, 0]), int(p[1, 1]),
                                         int(p[3, 0]), int(p[3, 1])))
        raise UnsupportedGraph(f"TFLite operator {name} is not supported")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # channels-last (TFLite's own layout): its depthwise convolutions and their gradients take 0.6x the
        # time of the default layout on CPU (the mappers' pose and expression terms run it twice a step)
        values = {self.input_index: x.contiguous(memory_format=torch.channels_last)}
        for op in self.ops:
            kind, src, out = op[0], values[op[1]], op[2]
            if kind == "conv":
                _, _, _, w, b, stride, pad, conv_padding, groups, act = op
                y = F.conv2d(F.pad(src, pad) if any(pad) else src, getattr(self, w),
                             getattr(self, b) if b else None, stride=stride, padding=conv_padding, groups=groups)
                values[out] = _ACTIVATIONS[act](y)
            elif kind == "prelu":
                values[out] = F.prelu(src, getattr(self, op[3]))
            elif kind == "add":
                values[out] = _ACTIVATIONS[op[4]](src + values[op[3]])
            elif kind == "maxpool":
                _, _, _, k, s, pad = op
                y = F.pad(src, pad, value=float("-inf")) if any(pad) else src
                values[out] = F.max_pool2d(y, k, s)
            elif kind == "pad":
                values[out] = F.pad(src, op[3])
        return [values[i] for i in self.output_indices]
