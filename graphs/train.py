"""The training graphs: supervised training of the first model, and distillation into a
student whose classifier has grown by the discovered classes."""

from __future__ import annotations

from collections.abc import Callable

import gin
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import CosineAnnealingScheduler
from torch import nn

from components.data import ImageSet, image_loader
from graphs.handlers import progress


def _views(augment: nn.Module, x: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [augment(x) for _ in range(n)]


def _batch(batch, device: torch.device, *modules: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Put ``modules`` in training mode and the batch's images and labels on ``device``."""
    for module in modules:
        module.train()
    x, y, _ = batch
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> dict[str, float]:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item()}


def _fit(
    engine: Engine,
    loader,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    description: str,
    on_first_step: Callable[[], None] | None,
    cosine: bool = True,
) -> Engine:
    """Cosine learning-rate decay to zero over the run (unless ``cosine=False``), a progress
    bar, then run."""
    if cosine:
        lr = optimizer.param_groups[0]["lr"]
        total = epochs * len(loader)
        engine.add_event_handler(
            Events.ITERATION_STARTED,
            CosineAnnealingScheduler(optimizer, "lr", lr, 0.0, cycle_size=total + 1),
        )
    if on_first_step is not None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda _: on_first_step())
    with progress(engine, description):
        engine.run(loader, max_epochs=epochs)
    return engine


def make_loss(loss: nn.Module | Callable[..., nn.Module] | None, images: ImageSet,
              num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``None`` is cross-entropy; an ``nn.Module`` is used as is; any other callable is a loss
    factory called with the training split's ``class_counts`` (``train.loss = @LDAMLoss``)."""
    if loss is None:
        return F.cross_entropy
    if isinstance(loss, nn.Module):
        return loss
    return loss(class_counts=torch.bincount(images.targets, minlength=num_classes).tolist())


def _follow_epochs(engine: Engine, target: object) -> None:
    """Tell ``target`` (a loss with a schedule, e.g. LDAM's deferred re-weighting) each epoch."""
    if hasattr(target, "set_epoch"):
        engine.add_event_handler(
            Events.EPOCH_STARTED,
            lambda e: target.set_epoch(e.state.epoch - 1, e.state.max_epochs),
        )


@gin.configurable(denylist=["model", "images", "augment", "device", "on_first_step"])
def train(
    model: nn.Module,
    images: ImageSet,
    augment: nn.Module,
    device: torch.device,
    epochs: int = 30,
    batch_size: int = 64,
    sampler: str = "class_balanced",
    loss: nn.Module | Callable[..., nn.Module] | None = None,
    optimizer: Callable[..., torch.optim.Optimizer] = gin.REQUIRED,
    seed: int = 0,
    on_first_step: Callable[[], None] | None = None,
) -> Engine:
    """Train ``model`` on labeled images with ``loss`` (cross-entropy by default, or a balanced
    loss built from the split's class counts, see :func:`make_loss`) on augmented batches drawn
    by ``sampler`` (``instance``, ``class_balanced``, ``sqrt`` or ``progressive``)."""
    model.to(device)
    opt = optimizer(model.parameters())
    criterion = make_loss(loss, images, getattr(model, "num_classes", 0))
    if isinstance(criterion, nn.Module):
        criterion.to(device)

    def update(engine: Engine, batch) -> dict[str, float]:
        x, y = _batch(batch, device, model, augment)
        # encode, not forward: the projector's BatchNorm statistics follow the features even
        # though only the classifier is trained here.
        return _step(opt, criterion(model.encode(augment(x))["logits"], y))

    loader = image_loader(images, batch_size, sampler=sampler, drop_last=True, seed=seed, epochs=epochs)
    engine = Engine(update)
    _follow_epochs(engine, criterion)
    return _fit(engine, loader, opt, epochs, f"train {images.name}", on_first_step)


@gin.configurable(denylist=["student", "teacher", "images", "augment", "device"])
def distill(
    student: nn.Module,
    teacher: nn.Module,
    images: ImageSet,
    augment: nn.Module,
    device: torch.device,
    loss: nn.Module = gin.REQUIRED,
    epochs: int = 30,
    batch_size: int = 64,
    sampler: str = "class_balanced",
    optimizer: Callable[..., torch.optim.Optimizer] = gin.REQUIRED,
    seed: int = 0,
) -> Engine:
    """Teach ``student`` (grown classifier) from labels and pseudo-labels in ``images`` and
    from ``teacher``'s old-class outputs on the same augmented batch."""
    student.to(device)
    teacher.to(device).eval()
    opt = optimizer(student.parameters())

    def update(engine: Engine, batch) -> dict[str, float]:
        x, y = _batch(batch, device, student, augment)
        x = augment(x)
        with torch.no_grad():
            teacher_logits = teacher(x)
        return _step(opt, loss(student(x), y, teacher_logits))

    loader = image_loader(images, batch_size, sampler=sampler, drop_last=True, seed=seed)
    return _fit(Engine(update), loader, opt, epochs, f"distill {images.name}", None)


@gin.configurable(denylist=["model", "labeled", "unlabeled", "augment", "device"])
def adapt(
    model: nn.Module,
    labeled: ImageSet,
    unlabeled: ImageSet,
    augment: nn.Module,
    device: torch.device,
    loss: nn.Module = gin.REQUIRED,
    ce_weight: float = 0.5,
    epochs: int = 60,
    batch_size: int = 128,
    optimizer: Callable[..., torch.optim.Optimizer] = gin.REQUIRED,
    cosine: bool = True,
    seed: int = 0,
) -> Engine:
    """Representation learning on labeled and unlabeled images together before clustering, as
    GCD does (Vaze et al., CVPR 2022): ``loss`` (e.g. :class:`GCDContrastive`) on the projections
    of two augmented views, plus ``ce_weight`` · cross-entropy on the labeled images."""
    model.to(device)
    opt = optimizer(model.parameters())
    both = ImageSet(
        torch.cat([labeled.images, unlabeled.images]),
        torch.cat([labeled.targets, torch.full((len(unlabeled),), -1)]),
        labeled.classes, f"{labeled.name}+{unlabeled.name}",
    )

    def update(engine: Engine, batch) -> dict[str, float]:
        x, y = _batch(batch, device, model, augment)
        is_labeled = y >= 0
        first, second = (model.encode(v) for v in _views(augment, x, 2))
        value = loss(first["projected"], second["projected"], y, is_labeled)
        if is_labeled.any() and ce_weight:
            value = value + ce_weight * F.cross_entropy(first["logits"][is_labeled], y[is_labeled])
        return _step(opt, value)

    loader = image_loader(both, batch_size, sampler="instance", drop_last=True, seed=seed)
    return _fit(Engine(update), loader, opt, epochs, f"adapt {both.name}", None, cosine)
