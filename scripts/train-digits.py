#!/usr/bin/env python3
"""Trains sonde's embedded default model: a small residual CNN on scikit-learn's bundled digits.

Writes, next to each other in models/:
  digits.onnx      the model, input 'image' [batch, 1, 8, 8] float32, output 'logits' [batch, 10]
  digits-test.bin  the held-out test split (layout below)
  digits.json      what torch measured on that split, the split sizes, the seed and the versions

Run with Debian's python3 (python3-torch, python3-sklearn, python3-onnx):
  /usr/bin/python3 scripts/train-digits.py
It takes a few seconds on 2 cores; nothing is downloaded (load_digits ships with scikit-learn).

digits-test.bin layout (all little-endian; scripts/demo.js and test/digits.test.ts read it):
  offset 0   4 bytes   magic b"SDG1"
  offset 4   uint32    n, the number of images
  offset 8   uint32    height (8)
  offset 12  uint32    width (8)
  offset 16  float32   n * height * width pixels, image after image, row-major, already scaled
                       exactly as the model was trained (raw 0..16 pixel / 16), so a reader feeds
                       them to the model as they are
  then       uint8     n labels (0..9)
"""
import json
import os
import platform
import struct
import sys
import time

import numpy as np
import onnx
import sklearn
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 20240605
TEST_FRACTION = 0.2
EPOCHS = 60
BATCH = 64
OPSET = 13
# load_digits pixels are counts 0..16 of a 4x4 block of the original 32x32 bitmap.
PIXEL_SCALE = 16.0

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "models")


class ConvBnRelu(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class ResidualBlock(nn.Module):
    """relu(x + bn(conv(relu(bn(conv(x)))))): the conv + bn + residual add form sonde fuses."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvBnRelu(1, 16)          # 16 x 8 x 8
        self.block = ResidualBlock(16)         # 16 x 8 x 8
        self.pool = nn.MaxPool2d(2)            # 16 x 4 x 4
        self.widen = ConvBnRelu(16, 32)        # 32 x 4 x 4
        self.gap = nn.AdaptiveAvgPool2d(1)     # 32 x 1 x 1, exported as GlobalAveragePool
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.widen(self.pool(self.block(self.stem(x))))
        return self.head(torch.flatten(self.gap(x), 1))


def write_test_split(path, images, labels):
    n, h, w = images.shape
    with open(path, "wb") as f:
        f.write(b"SDG1")
        f.write(struct.pack("<III", n, h, w))
        f.write(images.astype("<f4").tobytes(order="C"))
        f.write(labels.astype(np.uint8).tobytes())


def main():
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    digits = load_digits()
    images = (digits.images / PIXEL_SCALE).astype(np.float32)  # [1797, 8, 8]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SEED)

    model = DigitsNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
    xt = torch.from_numpy(x_train).unsqueeze(1)
    yt = torch.from_numpy(y_train)
    gen = torch.Generator().manual_seed(SEED)
    t0 = time.time()
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), BATCH):
            idx = order[i:i + BATCH]
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    train_seconds = time.time() - t0

    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x_test).unsqueeze(1))
    predicted = logits.argmax(1).numpy()
    correct = int((predicted == y_test).sum())
    # The smallest gap between the top logit and the runner-up, relative to the largest |logit|:
    # another runtime whose logits agree within a smaller relative error cannot change a prediction.
    top2 = logits.topk(2, dim=1).values
    min_margin = float((top2[:, 0] - top2[:, 1]).min() / logits.abs().max())

    os.makedirs(OUT_DIR, exist_ok=True)
    onnx_path = os.path.join(OUT_DIR, "digits.onnx")
    # TrainingMode.PRESERVE (with the module in eval mode) exports BatchNormalization in inference
    # form but skips the eval peephole pass that would fold it into the preceding Conv: sonde's own
    # BN folding is what this model is meant to exercise. do_constant_folding=False likewise keeps
    # the graph as the layers wrote it.
    torch.onnx.export(
        model, torch.zeros(1, 1, 8, 8), onnx_path,
        input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET, do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE)

    proto = onnx.load(onnx_path)
    onnx.checker.check_model(proto)
    op_counts = {}
    for node in proto.graph.node:
        op_counts[node.op_type] = op_counts.get(node.op_type, 0) + 1
    bn_layers = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    if op_counts.get("BatchNormalization", 0) != bn_layers:
        sys.exit(f"expected {bn_layers} BatchNormalization nodes in {onnx_path}, found {op_counts}")
    for node in proto.graph.node:
        if node.op_type == "BatchNormalization" and len(node.output) != 1:
            sys.exit(f"BatchNormalization {node.name} exported in training form ({len(node.output)} outputs)")
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if batch_dim.dim_param != "batch":
        sys.exit(f"input batch axis is {batch_dim}, expected the symbolic 'batch'")

    test_path = os.path.join(OUT_DIR, "digits-test.bin")
    write_test_split(test_path, x_test, y_test)

    report = {
        "test_accuracy": correct / len(y_test),
        "test_correct": correct,
        "test_size": int(len(y_test)),
        "train_size": int(len(y_train)),
        "min_top1_margin_relative": min_margin,
        "seed": SEED,
        "test_fraction": TEST_FRACTION,
        "epochs": EPOCHS,
        "pixel_scale": PIXEL_SCALE,
        "opset": OPSET,
        "onnx_ops": dict(sorted(op_counts.items())),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "train_seconds": round(train_seconds, 1),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "sklearn": sklearn.__version__,
            "onnx": onnx.__version__,
            "numpy": np.__version__,
        },
    }
    with open(os.path.join(OUT_DIR, "digits.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
