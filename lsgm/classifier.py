"""Sample quality in a domain feature space: a small classifier per dataset, its penultimate features registered as a
torch-fidelity feature extractor, and FD / KID of samples against the training images (docs/algorithm.md §7.2).

Inception FID needs downloaded weights and means little on 28×28 grey-scale or 8×8 images. At this scale we report
**FD in <dataset>-classifier features**: the Fréchet distance (and KID) computed by torch-fidelity's own
``calculate_metrics`` with this module's extractor (``feature_extractor="lsgm-classifier"``), never called "FID".

* :class:`FeatureClassifier`: conv → BN → ReLU blocks, global average pooling to a ``4·width``-d feature, a linear
  head; input: uint8 levels scaled to [0, 1] (grey-scale replicated channels are reduced to the first).
* :func:`train_classifier` (``lsgm train-classifier DATASET``): seeded Adam training on the training split; test
  accuracy recorded in ``metrics.json``.
* :class:`ClassifierFeatureExtractor`: torch-fidelity's ``FeatureExtractorBase`` around a trained classifier
  (``features``: penultimate, for FD/KID; ``logits_unbiased``: for IS).
* :func:`classifier_fd`: FD and KID of uint8 samples against uint8 reference images.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lsgm.atomic import atomic_write_json
from lsgm.checkpoint import atomic_torch_save
from lsgm.errors import ModelFileError
from lsgm.runs import CLASSIFIERS_ROOT, ClassifierFiles

__all__ = ["FEATURE_EXTRACTOR_NAME", "ClassifierFeatureExtractor", "FeatureClassifier", "classifier_fd",
           "eval_fd_experiment", "load_classifier", "reference_for_fd", "register_extractor", "train_classifier"]

log = logging.getLogger("lsgm.classifier")

FEATURE_EXTRACTOR_NAME = "lsgm-classifier"
CLASSIFIER_FORMAT = "lsgm-classifier/1"


class FeatureClassifier(nn.Module):
    """A small CNN classifier whose penultimate layer is the feature space of the FD.

    Args:
        in_channels: image channels C (1 for grey-scale).
        num_classes: classes of the dataset.
        width: channels of the first block (features: ``4·width``).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        if in_channels < 1 or num_classes < 2 or width < 1:
            raise ValueError(f"in_channels={in_channels}, num_classes={num_classes}, width={width}: need >= 1, >= 2, "
                             ">= 1")
        self.in_channels, self.num_classes, self.width = int(in_channels), int(num_classes), int(width)

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        w = self.width
        self.body = nn.Sequential(block(in_channels, w), block(w, w), nn.MaxPool2d(2),
                                  block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2), block(2 * w, 4 * w))
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * w, num_classes))

    @property
    def feature_dim(self) -> int:
        return 4 * self.width

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, 4·width)`` of images in [0, 1], ``(B, C, H, W)``."""
        return F.adaptive_avg_pool2d(self.body(x01), 1).flatten(1)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)``."""
        return self.head(self.features(x01))


def _uint8_to_input(images: torch.Tensor, in_channels: int) -> torch.Tensor:
    """uint8 (B, C', H, W) on the 0..255 scale -> float [0, 1] with the classifier's C channels (grey: the first)."""
    return images[:, :in_channels].float() / 255.0


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))


@torch.no_grad()
def _accuracy(model: FeatureClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        logits = model(_uint8_to_input(images[i:i + batch], model.in_channels))
        correct += int((logits.argmax(1) == labels[i:i + batch]).sum())
    return correct / max(len(images), 1)


def train_classifier(dataset: str, *, data_root: Path, root: Path = CLASSIFIERS_ROOT, epochs: int = 2,
                     batch_size: int = 128,
                     learning_rate: float = 2e-3, width: int = 16, seed: int = 0, num_threads: Optional[int] = None,
                     max_images: Optional[int] = None) -> dict[str, Any]:
    """Train the dataset's feature classifier on its training split; write ``model.pt`` and ``metrics.json``.

    Seeded (data order and initialisation from ``seed``); Adam with a cosine learning-rate decay. The test accuracy
    (or the validation accuracy where the dataset has no test split) is recorded.

    Args:
        dataset: a prepared dataset with labels (digits, mnist, fashion_mnist).
        data_root: prepared datasets root.
        root: classifiers root (``data/classifiers``; files: :class:`lsgm.runs.ClassifierFiles`).
        epochs, batch_size, learning_rate, width, seed: training settings.
        num_threads: torch threads (None: torch's default).
        max_images: train on the first N training images only (tests; ``data.max_train_images``).

    Returns:
        The metrics written.
    """
    from lsgm.data.loader import load_split
    from lsgm.metrics import levels_to_uint8
    from lsgm.progress import progress
    from lsgm.provenance import peak_rss_mb

    if num_threads:
        torch.set_num_threads(num_threads)
    train = load_split(data_root, dataset, "train")
    if train.labels is None:
        raise ValueError(f"dataset {dataset!r} has no labels in {data_root}; a classifier needs them (re-run "
                         f"`lsgm prepare {dataset}` with this version)")
    eval_split = "test" if "test" in train.manifest["splits"] else "valid"
    test = load_split(data_root, dataset, eval_split)
    images = levels_to_uint8(train.images[:max_images], train.max_value)
    labels = train.labels[:max_images]
    test_images = levels_to_uint8(test.images, test.max_value)
    num_classes = int(train.manifest["splits"]["train"].get("num_classes", int(train.labels.max()) + 1))
    torch.manual_seed(seed)
    model = FeatureClassifier(images.shape[1], num_classes, width)
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
    steps_per_epoch = max(len(images) // batch_size, 1)
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    start = time.perf_counter()
    losses = []
    with progress(total, f"classifier {dataset}", unit="step") as bar:
        for epoch in range(epochs):
            model.train()
            order = _epoch_order(len(images), seed, epoch)
            for i in range(steps_per_epoch):
                idx = order[i * batch_size:(i + 1) * batch_size]
                loss = F.cross_entropy(model(_uint8_to_input(images[idx], model.in_channels)), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                bar.update(1)
    acc = _accuracy(model, test_images, test.labels)
    files = ClassifierFiles(dataset, root)
    atomic_torch_save({"format": CLASSIFIER_FORMAT, "dataset": dataset, "in_channels": model.in_channels,
                       "num_classes": num_classes, "width": width, "state_dict": model.state_dict()}, files.model)
    metrics = {"dataset": dataset, "eval_split": eval_split, "accuracy": acc, "num_eval_images": len(test_images),
               "train_images": len(images), "epochs": epochs, "batch_size": batch_size, "width": width,
               "feature_dim": model.feature_dim, "seed": seed, "final_train_loss": float(np.mean(losses[-50:])),
               "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}
    atomic_write_json(files.metrics, metrics)
    print(f"classifier {dataset}: {eval_split} accuracy {acc:.4f} ({len(test_images)} images) -> {files.dir}")
    return metrics


def load_classifier(path: str | os.PathLike) -> FeatureClassifier:
    """Rebuild a trained classifier from its ``model.pt`` (``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no classifier; run `lsgm train-classifier DATASET` first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"{path}: cannot be read ({type(exc).__name__}); rerun `lsgm train-classifier`") from exc
    if not isinstance(payload, dict) or payload.get("format") != CLASSIFIER_FORMAT:
        raise ModelFileError(f"{path}: not an lsgm classifier file (expected format {CLASSIFIER_FORMAT!r})")
    model = FeatureClassifier(payload["in_channels"], payload["num_classes"], payload["width"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def _extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class ClassifierFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity extractor: a trained :class:`FeatureClassifier` (its ``model.pt`` passed as
        ``feature_extractor_weights_path``); features ``features`` (penultimate) and ``logits_unbiased``."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise ValueError("the lsgm-classifier extractor needs feature_extractor_weights_path (its model.pt)")
            self.classifier = load_classifier(feature_extractor_weights_path)
            self.requires_grad_(False)

        @staticmethod
        def get_provided_features_list():
            return "features", "logits_unbiased"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits_unbiased", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)

        def forward(self, x):
            self.classifier.eval()
            feats = self.classifier.features(_uint8_to_input(x, self.classifier.in_channels))
            out = {"features": feats.double(), "logits_unbiased": self.classifier.head[1](feats).double()}
            return tuple(out[k] for k in self.features_list)

    return ClassifierFeatureExtractor


ClassifierFeatureExtractor = None  # the class, once register_extractor() has built it (torch-fidelity imported)


def register_extractor() -> str:
    """Register :class:`ClassifierFeatureExtractor` with torch-fidelity (once per process); returns its name."""
    global ClassifierFeatureExtractor
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if FEATURE_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        ClassifierFeatureExtractor = _extractor_class()
        torch_fidelity.register_feature_extractor(FEATURE_EXTRACTOR_NAME, ClassifierFeatureExtractor)
    return FEATURE_EXTRACTOR_NAME


def classifier_fd(samples: torch.Tensor, reference: torch.Tensor, *, classifier_path: str | os.PathLike,
                  kid_subset_size: int = 1000, batch_size: int = 500, cuda: bool = False) -> dict[str, float]:
    """FD and KID in classifier features of uint8 samples against uint8 reference images, by torch-fidelity.

    Args:
        samples: generated images, uint8 (N, C, H, W) on the 0..255 scale.
        reference: real images, uint8 (M, C, H, W) on the 0..255 scale.
        classifier_path: the dataset classifier's ``model.pt``.
        kid_subset_size: KID subset size (capped at the smaller set).
        batch_size: feature-extraction batch.
        cuda: run the extractor on CUDA.

    Returns:
        ``{"fd", "kid", "kid_std", "kid_subset_size", "num_samples", "num_reference"}``.
    """
    import torch_fidelity

    from lsgm.metrics import UInt8ImageDataset

    name = register_extractor()
    a, b = UInt8ImageDataset(samples), UInt8ImageDataset(reference)
    subset = min(int(kid_subset_size), len(a), len(b))
    out = torch_fidelity.calculate_metrics(
        input1=a, input2=b, fid=True, kid=True, feature_extractor=name,
        feature_extractor_weights_path=str(classifier_path), batch_size=batch_size, cuda=cuda, verbose=False,
        save_cpu_ram=True, kid_subset_size=subset, cache=False)
    return {"fd": float(out["frechet_inception_distance"]), "kid": float(out["kernel_inception_distance_mean"]),
            "kid_std": float(out["kernel_inception_distance_std"]), "kid_subset_size": subset,
            "num_samples": len(a), "num_reference": len(b)}


def reference_for_fd(cfg, data_root: Path) -> torch.Tensor:
    """The real images samples are compared with: the first ``eval_fd.max_reference_images`` training images as
    uint8 on the 0..255 scale (never binarised)."""
    from lsgm.data.loader import load_split
    from lsgm.metrics import levels_to_uint8

    split = load_split(data_root, cfg.data.dataset, "train")
    images = split.images[: cfg.eval_fd.max_reference_images]
    return levels_to_uint8(images, split.max_value).contiguous()


def eval_fd_experiment(cfg, *, run_root: Path, data_root: Path, tag: str = "",
                       classifier_root: Path = CLASSIFIERS_ROOT, metrics_root: Optional[Path] = None) -> dict[str, Any]:
    """``lsgm eval-fd EXP [--run TAG]``: FD and KID in <dataset>-classifier features of a sampling run's samples
    against the training images; writes ``eval/fd_<tag>.json`` with the classifier's accuracy and the samples'
    protocol.

    Args:
        cfg: experiment config (``eval_fd`` section).
        run_root, data_root: runs and prepared-data roots.
        tag: sampling run (``""``: the default ``sample/`` run; else a ``sample_runs`` tag).
        classifier_root: where ``lsgm train-classifier`` wrote the dataset's classifier.
        metrics_root: where the headline file ``fd_<tag>.json`` goes (:func:`lsgm.headline.headline_root`).
    """
    import json

    from lsgm.config import experiment_hash, set_args_text
    from lsgm.headline import fd_headline, headline_layout, write_headline
    from lsgm.provenance import peak_rss_mb
    from lsgm.device import resolve_device
    from lsgm.provenance import git_commit, sha256_file
    from lsgm.runs import RunLayout

    cuda = resolve_device(cfg.engine.device).type == "cuda"
    layout, files = RunLayout(run_root, cfg.name), ClassifierFiles(cfg.data.dataset, classifier_root)
    samples_path = layout.run_samples(tag)
    if not samples_path.is_file():
        raise FileNotFoundError(f"{samples_path}: no samples; run `lsgm sample {cfg.name}"
                                + (f" --run {tag}" if tag else "") + "` first")
    with np.load(samples_path) as npz:
        samples = torch.from_numpy(npz["images"])
    reference = reference_for_fd(cfg, data_root)
    start = time.perf_counter()
    ec = cfg.eval_fd
    fd = classifier_fd(samples, reference, classifier_path=files.model, kid_subset_size=ec.kid_subset_size,
                       batch_size=ec.batch_size, cuda=cuda)
    m = min(ec.subset_size, len(samples))  # the same N for every run (FD is biased upwards at small N)
    sub = classifier_fd(samples[:m], reference, classifier_path=files.model, kid_subset_size=ec.kid_subset_size,
                        batch_size=ec.batch_size, cuda=cuda)
    fd.update(fd_subset=sub["fd"], kid_subset=sub["kid"], kid_subset_std=sub["kid_std"], subset_size=m)
    stats = json.loads(layout.run_stats(tag).read_text()) if layout.run_stats(tag).is_file() else {}
    clf = json.loads(files.metrics.read_text()) if files.metrics.is_file() else {}
    result = {**fd, "metric": f"FD in {cfg.data.dataset}-classifier features", "run": tag or "default",
              "feature_extractor": FEATURE_EXTRACTOR_NAME, "feature_dim": clf.get("feature_dim"),
              "classifier": str(files.model), "classifier_sha256": sha256_file(files.model),
              "classifier_accuracy": clf.get("accuracy"), "classifier_eval_split": clf.get("eval_split"),
              "reference": f"first {len(reference)} training images",
              "sampling": {k: stats.get(k) for k in ("model", "sampler", "steps", "tol", "ode_eps", "nfe_mean",
                                                     "seconds_mean", "num_samples", "checkpoint")},
              "samples_sha256": sha256_file(samples_path), "seconds": time.perf_counter() - start,
              "peak_rss_mb": peak_rss_mb(), "commit": git_commit(), "experiment_hash": experiment_hash(cfg),
              "command": f"lsgm eval-fd {cfg.name}" + (f" --run {tag}" if tag else "") + set_args_text(cfg)}
    atomic_write_json(layout.fd(tag), result)
    write_headline(headline_layout(cfg.name, run_root, metrics_root).fd(tag), fd_headline(result))
    print(f"FD in {cfg.data.dataset}-classifier features {fd['fd']:.4g}, KID {fd['kid']:.4g} "
          f"({len(samples)} samples) -> {layout.fd(tag)}")
    return result
