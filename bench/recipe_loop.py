# ruff: noqa: E741, B007  (the recipe's own names, kept verbatim)
"""A faithful re-implementation of the recipe's training loop, the baseline hpo is measured against.

Kept as the recipe wrote it: a per-sample Dataset, a DataLoader, ``.item()`` and an sklearn-style
accuracy on host copies every batch, albumentations one image at a time, softmax before argmax.
Only the device is a parameter, and ``ckpt.pt`` goes to a temporary folder. It needs
scikit-learn, as the recipe does: ``pip install -e .[bench]``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    from sklearn.metrics import accuracy_score
except ImportError:
    raise SystemExit("bench: the recipe's loop needs scikit-learn; pip install -e '.[bench]'") from None


class Dataset(torch.utils.data.Dataset):
    """The recipe's Dataset: without ``trans`` it converts everything up front, as its first one."""

    def __init__(self, X, Y, device, trans=None):
        self.trans, self.device = trans, device
        if trans:
            self.X, self.Y = X, Y
        else:
            self.X = torch.from_numpy(X / 255.).float().to(device).view(-1, X[0].size)
            self.Y = torch.from_numpy(Y).long().to(device)

    def __len__(self):
        return len(self.X)

    def __getitem__(self, ix):
        if not self.trans:
            return self.X[ix], self.Y[ix]
        img = self.trans(image=self.X[ix])["image"]
        img = torch.from_numpy(img / 255.).float().to(self.device).view(-1)
        label = torch.tensor(self.Y[ix]).long().to(self.device)
        return img, label


def build_model(device, D_in=32 * 32 * 3, H=100, D_out=10, batch_norm=False):
    if batch_norm:
        layers = [torch.nn.Linear(D_in, H), torch.nn.BatchNorm1d(H), torch.nn.ReLU(),
                  torch.nn.Linear(H, H), torch.nn.BatchNorm1d(H), torch.nn.ReLU(), torch.nn.Linear(H, D_out)]
    else:
        layers = [torch.nn.Linear(D_in, H), torch.nn.ReLU(), torch.nn.Linear(H, H), torch.nn.ReLU(),
                  torch.nn.Linear(H, D_out)]
    return torch.nn.Sequential(*layers).to(device)


def softmax(x):
    return torch.exp(x) / torch.exp(x).sum(axis=-1, keepdims=True)


def fit(model, dataloader, optimizer, scheduler=None, epochs=10, early_stopping=0):
    """The recipe's ``fit``; also returns the seconds spent in training phases."""
    criterion = torch.nn.CrossEntropyLoss()
    ckpt = Path(tempfile.mkdtemp()) / "ckpt.pt"
    l, acc, lr, val_l, val_acc = [], [], [], [], []
    best_acc, step, train_seconds = 0, 0, 0.0
    for e in range(1, epochs + 1):
        _l, _acc = [], []
        for param_group in optimizer.param_groups:
            lr.append(param_group['lr'])
        t0 = time.perf_counter()
        model.train()
        for x_b, y_b in dataloader['train']:
            y_pred = model(x_b)
            loss = criterion(y_pred, y_b)
            _l.append(loss.item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            y_probas = torch.argmax(softmax(y_pred), axis=1)
            _acc.append(accuracy_score(y_b.cpu().numpy(), y_probas.cpu().detach().numpy()))
        train_seconds += time.perf_counter() - t0
        l.append(np.mean(_l))
        acc.append(np.mean(_acc))
        model.eval()
        _l, _acc = [], []
        with torch.no_grad():
            for x_b, y_b in dataloader['val']:
                y_pred = model(x_b)
                loss = criterion(y_pred, y_b)
                _l.append(loss.item())
                y_probas = torch.argmax(softmax(y_pred), axis=1)
                _acc.append(accuracy_score(y_b.cpu().numpy(), y_probas.cpu().numpy()))
        val_l.append(np.mean(_l))
        val_acc.append(np.mean(_acc))
        if val_acc[-1] > best_acc:
            best_acc = val_acc[-1]
            torch.save(model.state_dict(), ckpt)
            step = 0
        step += 1
        if scheduler:
            scheduler.step()
        if early_stopping and step > early_stopping:
            break
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    return {'loss': l, 'acc': acc, 'val_loss': val_l, 'val_acc': val_acc, 'lr': lr,
            'train_seconds': train_seconds}


def run(X_train, y_train, X_val, y_val, device, batch_size, lr, epochs, batch_norm=False, trans=None,
        seed=0):
    """One recipe training run; returns its history and train samples per second."""
    torch.manual_seed(seed)
    dataloader = {
        'train': torch.utils.data.DataLoader(Dataset(X_train, y_train, device, trans), batch_size=batch_size,
                                             shuffle=True),
        'val': torch.utils.data.DataLoader(Dataset(X_val, y_val, device), batch_size=1000, shuffle=False),
    }
    model = build_model(device, D_in=X_train[0].size, batch_norm=batch_norm)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    hist = fit(model, dataloader, optimizer, epochs=epochs)
    hist['train_samples_per_s'] = len(X_train) * len(hist['loss']) / hist['train_seconds']
    return hist
