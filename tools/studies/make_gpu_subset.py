"""Write the CIFAR-100 subset that travels to the GPU machine (15,000 train / 5,000 test, 59 MiB).

.venv/bin/python tools/studies/make_gpu_subset.py --root ../shared/data --out .cache/gpu
"""

import argparse
import os

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/data")
    ap.add_argument("--out", default=".cache/gpu")
    ap.add_argument("--train", type=int, default=15000)
    ap.add_argument("--test", type=int, default=5000)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    tr, te = np.load(f"{a.root}/cifar100_train_part1.npz"), np.load(f"{a.root}/cifar100_test.npz")
    np.savez(f"{a.out}/cifar100_train_sub.npz", x=tr["x"][: a.train], y=tr["y"][: a.train])  # class-balanced order
    np.savez(f"{a.out}/cifar100_test.npz", x=te["x"][: a.test], y=te["y"][: a.test])
    print(f"wrote {a.out}: {a.train} train, {a.test} test")


if __name__ == "__main__":
    main()
