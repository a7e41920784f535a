"""How good, and how fast on this machine, is a small CNN on Fashion-MNIST? A candidate teacher for distilling
into srvit_fashion, measured before `srvit train --teacher-epochs` existed (docs/training.md has that run).

The network of `srvit.teacher.small_cnn`; AdamW with a one-cycle schedule, label smoothing 0.1, the ±2 px shift and
flip of `srvit.data.shift_flip`. Prints test top-1 and seconds after every epoch.

    python benchmarks/cnn_teacher_pilot.py --epochs 6
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from srvit.data import FASHION_MNIST_DIR, fashion_mnist_dataset, shift_flip
from srvit.teacher import small_cnn, top1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = fashion_mnist_dataset(FASHION_MNIST_DIR, "train").tensors
    test = fashion_mnist_dataset(FASHION_MNIST_DIR, "test")
    net = small_cnn(1, 10)
    steps_per_epoch = len(x) // args.batch_size
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.epochs * steps_per_epoch)
    print(f"{sum(p.numel() for p in net.parameters()):,} parameters")
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        net.train()
        order = torch.randperm(len(x))
        for i in range(steps_per_epoch):
            batch = order[i * args.batch_size : (i + 1) * args.batch_size]
            loss = F.cross_entropy(net(shift_flip(x[batch], pad=2)), y[batch], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        seconds = time.time() - t0
        accuracy = top1(net, test, torch.device("cpu"))
        print(f"epoch {epoch}: test top-1 {100 * accuracy:.2f}%, {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
