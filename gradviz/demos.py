"""Demo models with built-in data (no download), each showing one kind of gradient flow.

Every demo is a model plus a seeded synthetic task it can learn, so ``python extract.py``
works offline and the same seed gives the same numbers. The deep-sigmoid and deep-linear
demos are built to go wrong (vanishing, exploding), as in the reference tutorial.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

N_CLASSES = 4
IN_FEATURES = 32


class MLP(nn.Module):
    """fc1 -> ReLU -> fc2 -> ReLU -> fc3, named as in the original example."""

    def __init__(self, d_in: int = IN_FEATURES, hidden: int = 64, d_out: int = N_CLASSES):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden // 2)
        self.fc3 = nn.Linear(hidden // 2, d_out)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class DeadReLU(MLP):
    """The MLP with large negative biases: most ReLU units never fire (dead ReLUs)."""

    def __init__(self) -> None:
        super().__init__()
        for layer in (self.fc1, self.fc2):
            nn.init.constant_(layer.bias, -3.0)


class Saturating(nn.Module):
    """A sigmoid MLP with large weights: its units sit at 0 or 1 (saturation)."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, N_CLASSES)
        self.act = nn.Sigmoid()
        for layer in (self.fc1, self.fc2):
            nn.init.normal_(layer.weight, std=8.0 / math.sqrt(layer.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class Unused(MLP):
    """The MLP plus a layer that is never called: it never gets a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(IN_FEATURES, N_CLASSES)


class DeepSigmoid(nn.Module):
    """20 Linear+Sigmoid layers of width 100: gradients vanish towards the input."""

    def __init__(self, depth: int = 20, width: int = 100):
        super().__init__()
        dims = [IN_FEATURES] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:], strict=False))
        self.act = nn.Sigmoid()
        self.head = nn.Linear(width, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.act(layer(x))
        return self.head(x)


class DeepLinear(nn.Module):
    """30 bias-free Linear layers, init std 1.5/sqrt(width): gradients explode."""

    def __init__(self, depth: int = 30, width: int = 100):
        super().__init__()
        dims = [IN_FEATURES] + [width] * (depth - 1) + [N_CLASSES]
        pairs = zip(dims, dims[1:], strict=False)
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in pairs)
        for layer in self.layers:
            assert isinstance(layer, nn.Linear)  # for the type checker
            nn.init.normal_(layer.weight, std=1.5 / math.sqrt(layer.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Block(nn.Module):
    """Two Linear layers with a ReLU between them; with ``residual``, a skip around both."""

    def __init__(self, dim: int, residual: bool):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.act = nn.ReLU()
        self.residual = residual
        if residual:  # small last layer, so 50 blocks keep the stream's scale
            nn.init.normal_(self.fc2.weight, std=0.1 / math.sqrt(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act(self.fc1(x)))
        return x + y if self.residual else self.act(y)


class Stack(nn.Module):
    """inp -> 50 blocks -> head: the plain and residual demos differ only in the skip."""

    def __init__(self, residual: bool, blocks: int = 50, dim: int = 128):
        super().__init__()
        self.inp = nn.Linear(IN_FEATURES, dim)
        self.blocks = nn.ModuleList(Block(dim, residual) for _ in range(blocks))
        self.head = nn.Linear(dim, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Dense(nn.Module):
    """DenseNet-style: each block reads the concatenation of the input and all earlier blocks."""

    def __init__(self, d_in: int = 784, blocks: int = 20, growth: int = 32):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d_in + i * growth, growth) for i in range(blocks))
        self.act = nn.ReLU()
        self.head = nn.Linear(d_in + blocks * growth, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for block in self.blocks:
            features.append(self.act(block(torch.cat(features, dim=1))))
        return self.head(torch.cat(features, dim=1))


class CNN(nn.Module):
    """Two conv layers, pooling, a linear head, for 1x16x16 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16 * 4 * 4, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        return self.fc(self.flatten(x))


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: in-place ReLU and ``out += identity``."""

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        c_in = channels // stride
        self.conv1 = nn.Conv2d(c_in, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.inplace = True  # `out += identity`, as torchvision does
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.inplace:
            out += identity
        else:
            out = out + identity
        return self.relu(out)


class ResNet(nn.Module):
    """A small ResNet of BasicBlocks for 1x16x16 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(16), BasicBlock(16))
        self.layer2 = nn.Sequential(BasicBlock(32, stride=2), BasicBlock(32))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class LSTMNet(nn.Module):
    """An LSTM over a sequence, classified from its last hidden state."""

    def __init__(self, d_in: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d_in, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, c) = self.lstm(x)
        return self.fc(out[:, -1])


class Attention(nn.Module):
    """Multi-head self-attention: one qkv projection, one output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    """A small encoder over token sequences, mean-pooled into a classifier."""

    def __init__(self, vocab: int = 16, dim: int = 32, heads: int = 4, depth: int = 2,
                 seq_len: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x).mean(dim=1))


# -- data --------------------------------------------------------------------------------


def vectors(n: int, d: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs labelled by a fixed random linear teacher: learnable, not trivial."""
    x = torch.randn(n, d, generator=g)
    teacher = torch.randn(d, N_CLASSES, generator=g)
    return x, (x @ teacher).argmax(dim=1)


def images(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy 16x16 images with a bright square in one of four quadrants: the label."""
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 16, 16, generator=g)
    for q in range(4):
        r, c = divmod(q, 2)
        x[y == q, :, 8 * r + 2 : 8 * r + 6, 8 * c + 2 : 8 * c + 6] += 1.0
    return x, y


def sequences(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Length-12 sequences of 4 features; the label says whether feature 0 sums above 0."""
    x = torch.randn(n, 12, 4, generator=g)
    return x, (x[:, :, 0].sum(dim=1) > 0).long()


def tokens(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences; the label says whether token 1 occurs more often than token 2."""
    x = torch.randint(0, 16, (n, 12), generator=g)
    # Make the two counts differ often enough that the task is not mostly ties.
    flip = torch.rand(n, generator=g) < 0.5
    x[flip, 0] = 1
    x[~flip, 0] = 2
    ones, twos = (x == 1).sum(dim=1), (x == 2).sum(dim=1)
    return x, (ones > twos).long()


@dataclass(frozen=True)
class Demo:
    """A demo: how to build the model and its data, and what it shows."""

    name: str
    summary: str
    build: Callable[[], nn.Module]
    data: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


DEMOS: dict[str, Demo] = {
    d.name: d
    for d in [
        Demo("mlp", "MLP fc1-fc2-fc3 with ReLU: healthy flow", MLP,
             lambda n, g: vectors(n, IN_FEATURES, g)),
        Demo("dead-relu", "the MLP with large negative biases: dead ReLUs", DeadReLU,
             lambda n, g: vectors(n, IN_FEATURES, g)),
        Demo("saturating", "a sigmoid MLP with large weights: saturation", Saturating,
             lambda n, g: vectors(n, IN_FEATURES, g)),
        Demo("unused", "the MLP plus a layer that is never called: no gradient", Unused,
             lambda n, g: vectors(n, IN_FEATURES, g)),
        Demo("deep-sigmoid", "20 Linear+Sigmoid layers: vanishing gradients", DeepSigmoid,
             lambda n, g: vectors(n, IN_FEATURES, g)),
        Demo("deep-linear", "30 bias-free Linear layers, std 1.5/sqrt(width): exploding",
             DeepLinear, lambda n, g: vectors(n, IN_FEATURES, g)),
        Demo("plain", "50 two-Linear ReLU blocks without skips", lambda: Stack(False),
             lambda n, g: vectors(n, IN_FEATURES, g)),
        Demo("residual", "50 two-Linear blocks with a skip connection each",
             lambda: Stack(True), lambda n, g: vectors(n, IN_FEATURES, g)),
        Demo("dense", "DenseNet-style: each block reads all earlier outputs (torch.cat)",
             Dense, lambda n, g: vectors(n, 784, g)),
        Demo("cnn", "two conv layers on 16x16 images", CNN, images),
        Demo("resnet", "ResNet BasicBlocks with in-place ReLU and out += identity", ResNet,
             images),
        Demo("lstm", "an LSTM over sequences (nested tuple outputs)", LSTMNet, sequences),
        Demo("transformer", "a 2-block pre-norm transformer encoder", Transformer, tokens),
    ]
}
