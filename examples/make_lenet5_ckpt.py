"""Regenerate ``lenet5.ckpt``: LeNet-5 (examples/models.py) trained briefly on the digits.

    python examples/make_lenet5_ckpt.py

Deterministic (seed 0, CPU): trains 20 epochs on the first 1,500 digits, reports accuracy on the
last 297, and saves the state dict (about 85 KB) next to this script.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from models import LeNet5

HERE = Path(__file__).resolve().parent


def main() -> None:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).div_(16.0).reshape(-1, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.int64)
    x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
    model = LeNet5()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(20):
        order = torch.randperm(len(x_train))
        for i in range(0, len(order), 32):
            index = order[i:i + 32]
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[index]), y_train[index]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    torch.save(model.state_dict(), HERE / "lenet5.ckpt")
    print(f"wrote {HERE / 'lenet5.ckpt'} (held-out accuracy {accuracy:.1%})")


if __name__ == "__main__":
    main()
