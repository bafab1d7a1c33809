#!/usr/bin/env python
"""Train a ResNet eager and fused side by side, and plot both learning curves.

Both models start from the same weights and see the same batches in the same order; the
only difference is that one runs torchvision's modules and the other runs the same modules
after ``resnet_fused.fuse`` (conv + BatchNorm + ReLU fused, batch statistics and running
statistics as nn.BatchNorm2d). Their curves should agree within run-to-run noise.

Datasets:
  digits         scikit-learn's bundled 8x8 handwritten digits (no network), upsampled
  fashion-mnist  torchvision's FashionMNIST (downloaded into --data if possible)
  cifar10        torchvision's CIFAR10 (likewise)

  python examples/train.py                       # digits, 6 epochs, CPU or GPU
  python examples/train.py --dataset cifar10 --epochs 10 --size 32
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import resnet_fused


def load_digits(size):
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    n_test = len(y) // 5
    te, tr = perm[:n_test], perm[n_test:]
    return (x[tr], y[tr]), (x[te], y[te]), 1, 10


def load_torchvision(name, size, root):
    import torchvision
    import torchvision.transforms as T

    cls = {"fashion-mnist": torchvision.datasets.FashionMNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    tf = T.Compose([T.Resize(size), T.ToTensor()])
    try:
        train = cls(root, train=True, download=True, transform=tf)
        test = cls(root, train=False, download=True, transform=tf)
    except Exception as e:  # no network
        sys.exit(f"could not load {name} ({e}); use --dataset digits, which needs no network")

    def stack(ds):
        xs, ys = zip(*[ds[i] for i in range(len(ds))])
        x = torch.stack(xs)
        return (x - x.mean()) / x.std(), torch.tensor(ys)

    (xtr, ytr), (xte, yte) = stack(train), stack(test)
    return (xtr, ytr), (xte, yte), xtr.shape[1], 10


def small_image_resnet(arch, in_ch, classes):
    """A torchvision ResNet with the stem adapted to small images (3x3 stride-1 conv, no
    max-pool), as the CIFAR-style experiments do."""
    import torchvision

    m = getattr(torchvision.models, arch)(num_classes=classes)
    m.conv1 = nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


def evaluate(model, x, y, bs, device):
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(y), bs):
            xb, yb = x[i:i + bs].to(device), y[i:i + bs].to(device)
            out = model(xb)
            loss += F.cross_entropy(out, yb, reduction="sum").item()
            correct += (out.argmax(1) == yb).sum().item()
    model.train()
    return loss / len(y), correct / len(y)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist", "cifar10"])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--size", type=int, default=16, help="image side after upsampling (digits) or resizing")
    ap.add_argument("--limit", type=int, default=0, help="use only this many training images (smoke runs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", default=os.path.expanduser("~/.cache/resnet_fused_data"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a nicety
        def tqdm(it, **kw):
            return it

    if args.dataset == "digits":
        (xtr, ytr), (xte, yte), in_ch, classes = load_digits(args.size)
    else:
        (xtr, ytr), (xte, yte), in_ch, classes = load_torchvision(args.dataset, args.size, args.data)
    if args.limit:
        xtr, ytr = xtr[:args.limit], ytr[:args.limit]
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    eager = small_image_resnet(args.arch, in_ch, classes).to(dev)
    fused = resnet_fused.fuse(copy.deepcopy(eager))
    if dev.type == "cuda":
        eager = eager.to(memory_format=torch.channels_last)
        fused = fused.to(memory_format=torch.channels_last)
    models = {"eager": eager, "fused": fused}
    opts = {k: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4) for k, m in models.items()}
    sched = {k: torch.optim.lr_scheduler.CosineAnnealingLR(o, args.epochs) for k, o in opts.items()}
    print(f"{args.arch} on {args.dataset} ({len(ytr)} train / {len(yte)} test, {args.size}x{args.size}), "
          f"device {dev}, resnet_fused backends {resnet_fused.available_backends()}")
    rows = []
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(len(ytr), generator=g)
        sums = {k: [0.0, 0, 0] for k in models}  # loss, correct, seen
        t0 = time.time()
        bar = tqdm(range(0, len(ytr), args.batch_size), desc=f"epoch {epoch}/{args.epochs}", leave=False)
        for i in bar:
            idx = perm[i:i + args.batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs more than one value per channel
            xb, yb = xtr[idx].to(dev), ytr[idx].to(dev)
            for k, m in models.items():
                opts[k].zero_grad(set_to_none=True)
                out = m(xb)
                loss = F.cross_entropy(out, yb)
                loss.backward()
                opts[k].step()
                sums[k][0] += loss.item() * len(idx)
                sums[k][1] += (out.argmax(1) == yb).sum().item()
                sums[k][2] += len(idx)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix({k: f"{v[0] / v[2]:.3f}" for k, v in sums.items()})
        for s in sched.values():
            s.step()
        row = {"epoch": epoch, "seconds": round(time.time() - t0, 2)}
        for k, m in models.items():
            te_loss, te_acc = evaluate(m, xte, yte, 256, dev)
            row.update({f"{k}_train_loss": sums[k][0] / sums[k][2], f"{k}_train_acc": sums[k][1] / sums[k][2],
                        f"{k}_test_loss": te_loss, f"{k}_test_acc": te_acc})
        rows.append(row)
        print(f"epoch {epoch:3d}  " + "  ".join(
            f"{k}: loss {row[f'{k}_train_loss']:.4f} train acc {row[f'{k}_train_acc']:.4f} "
            f"test acc {row[f'{k}_test_acc']:.4f}" for k in models), flush=True)

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"train_{args.dataset}_{args.arch}_{dev.type}")
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        ep = [r["epoch"] for r in rows]
        for k, style in (("eager", "-o"), ("fused", "--x")):
            ax[0].plot(ep, [r[f"{k}_train_loss"] for r in rows], style, label=f"{k} train")
            ax[0].plot(ep, [r[f"{k}_test_loss"] for r in rows], style, alpha=0.5, label=f"{k} test")
            ax[1].plot(ep, [r[f"{k}_test_acc"] for r in rows], style, label=f"{k} test")
        ax[0].set(xlabel="epoch", ylabel="cross-entropy", title="loss")
        ax[1].set(xlabel="epoch", ylabel="accuracy", title="test accuracy")
        for a in ax:
            a.legend()
            a.grid(alpha=0.3)
        fig.suptitle(f"{args.arch} on {args.dataset}: eager vs resnet_fused ({dev.type})")
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=100)
        print(f"wrote {stem}.csv and {stem}.png")
    except ImportError:
        print(f"wrote {stem}.csv (matplotlib not installed: no plot)")
    last = rows[-1]
    return last["eager_test_acc"], last["fused_test_acc"]


if __name__ == "__main__":
    main()
