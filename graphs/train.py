"""The training graphs: supervised training of the first model, and distillation into a
student whose classifier has grown by the discovered classes."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import gin
import ignite.distributed as idist
import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import CosineAnnealingScheduler
from ignite.metrics import Average
from torch import nn

from components.data import ImageSet, concat_images, image_loader
from components.data.checks import check_model_input
from components.models.network import global_batchnorm
from graphs.handlers import check_finite_loss, log, progress, resume_stage, tensorboard_logging


class TrainingForward(nn.Module):
    """A training step's whole forward pass through ``model`` as one module call, so that
    ``DistributedDataParallel`` (which syncs the gradients of what runs through its own
    ``forward``) sees all of it: ``model.encode`` of each view, ``augment`` (when given)
    applied to each view right before it is encoded, keeping the ``outputs`` the step uses
    (the others are computed, e.g. for their BatchNorm statistics, and dropped); or
    ``model(view)`` (logits) with ``logits_only``. Returns one output per view. In one process
    it is only these calls."""

    def __init__(self, model: nn.Module, outputs: tuple[str, ...] = ("logits",),
                 bf16: bool = False, channels_last: bool = False) -> None:
        super().__init__()
        self.model, self.outputs = model, outputs
        self.bf16, self.channels_last = bf16, channels_last

    def forward(self, *views: torch.Tensor, augment: nn.Module | None = None,
                logits_only: bool = False) -> list:
        outs = []
        for x in views:
            x = augment(x) if augment is not None else x
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            # bf16 autocast runs the model's matmuls and convolutions in bfloat16; the outputs go
            # back to float32, so every loss (and its softmax) is computed as without it
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                if logits_only:
                    out = self.model(x)
                else:
                    encoded = self.model.encode(x)
                    out = {name: encoded[name] for name in self.outputs}
            outs.append(out.float() if logits_only else {k: v.float() for k, v in out.items()})
        return outs


# the part of a Network each encoded output comes from (all of them start at the backbone)
_HEADS = {"projected": "projector", "logits": "classifier", "evidence": "confidence"}


def _leaves_parameters_unused(model: nn.Module, outputs: tuple[str, ...]) -> bool:
    """Whether a step using only ``outputs`` leaves some trainable parameter without a gradient
    (DDP must then look for them every step); True unless ``model`` is shaped like a Network."""
    if not hasattr(model, "backbone") or any(p.requires_grad for p in model.parameters(recurse=False)):
        return True
    used = {"backbone"} | {_HEADS[name] for name in outputs if name in _HEADS}
    return any(p.requires_grad for name, child in model.named_children() if name not in used
               for p in child.parameters())


@gin.configurable(denylist=["model", "outputs"])
def data_parallel(model: nn.Module, outputs: tuple[str, ...] = ("logits",),
                  sync_batchnorm: bool = False, bf16: bool = False, channels_last: bool = False,
                  compile: bool = False, compile_options: dict | None = None) -> nn.Module:
    """What the training graphs call for their forward pass: :class:`TrainingForward` of
    ``model`` keeping ``outputs``, and in a distributed run that module wrapped for DDP by
    ``idist.auto_model`` (gradients averaged over the processes; ``find_unused_parameters``
    when the step leaves a head unused). Wrap again after ``grow()``: it replaces parameters.
    ``sync_batchnorm``: BatchNorm statistics over the global batch (``SyncBatchNorm``, CUDA
    only; the model keeps the converted layers, which act as BatchNorm in eval mode).
    ``bf16``: mixed precision (bfloat16 autocast, no loss scaling needed) for every training
    graph's forward pass; ``channels_last``: the model and its input batches in NHWC layout
    (faster convolutions on recent GPUs and CPUs). Both are off by default: the CPU path the
    tables were measured on stays float32 NCHW.
    ``compile``: the training forward (augmentation, model, outputs; after the DDP wrap) through
    ``torch.compile(**compile_options)`` (default inductor: a C++ compiler on the CPU, Triton on
    GPUs); each stage compiles on its first step, and random augmentation draws differ from
    eager ones. Off by default: on 2 CPU cores it trained 1.06-1.14x faster after 23-27 s of
    compiling (docs/benchmarks.md, torch.compile)."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    forward = TrainingForward(model, outputs, bf16, channels_last)
    if idist.get_world_size() > 1:
        if sync_batchnorm and idist.device().type != "cuda":  # torch's SyncBatchNorm is CUDA only
            global_batchnorm(model)
            sync_batchnorm = False
        # a conv over one input channel: its gradient's strides differ from DDP's bucket only in a
        # dimension of size 1, which DDP reports as a possible slowdown it is not
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        forward = idist.auto_model(forward, sync_bn=sync_batchnorm,
                                   find_unused_parameters=_leaves_parameters_unused(model, outputs))
    return torch.compile(forward, **(compile_options or {})) if compile else forward


def _share_buffers(model: nn.Module) -> None:
    """Process 0's buffers (BatchNorm running statistics) in every process: DDP broadcasts them
    before each forward, so after the last one each process holds its own last update."""
    if idist.get_world_size() > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


def _loader(images: ImageSet, batch_size: int, **kwargs):
    """``image_loader`` of this process's shard of every global batch of ``batch_size``."""
    if idist.get_world_size() == 1:
        return image_loader(images, batch_size, **kwargs)
    return image_loader(images, batch_size, world_size=idist.get_world_size(), rank=idist.get_rank(),
                        **kwargs)


def _labeled_cross_entropy(logits: torch.Tensor, y: torch.Tensor, is_labeled: torch.Tensor) -> torch.Tensor:
    """Across processes, the cross-entropy of this process's labeled samples, summed, times the
    number of processes over the labeled samples of all of them: DDP's mean of the gradients is
    then the gradient of the one-process mean over the global batch's labeled samples (their
    count differs between the processes)."""
    total = idist.all_reduce(is_labeled.sum().float())
    if total == 0:
        return logits.sum() * 0.0
    value = F.cross_entropy(logits[is_labeled], y[is_labeled], reduction="sum")
    return value * idist.get_world_size() / total


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
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    description: str,
    on_first_step: Callable[[], None] | None,
    cosine: bool = True,
    tracked: tuple[str, ...] = ("loss",),
    resumable: bool = True,
) -> Engine:
    """Cosine learning-rate decay to zero over the run (unless ``cosine=False``), a progress
    bar, then run. The epoch means of the ``tracked`` step outputs (Ignite ``Average``
    metrics) are kept, one dict per epoch, in ``engine.state.history`` (the report's curves).

    Inside a command-line run the stage checkpoints every epoch and resumes from an earlier,
    interrupted run (:func:`graphs.handlers.resume_stage`), unless ``resumable=False``; a
    non-finite loss ends it at once with a message (:func:`graphs.handlers.check_finite_loss`)."""
    stage = description.split()[0]
    for key in tracked:
        Average(output_transform=lambda out, key=key: out[key]).attach(engine, key)
    check_finite_loss(engine, description, optimizer, checkpointed=resumable)
    engine.add_event_handler(
        Events.EPOCH_COMPLETED,
        lambda e: e.state.history.append({k: float(e.state.metrics[k]) for k in tracked}))
    objects = {"model": model, "optimizer": optimizer}
    if cosine:
        lr = optimizer.param_groups[0]["lr"]
        total = epochs * len(loader)
        scheduler = CosineAnnealingScheduler(optimizer, "lr", lr, 0.0, cycle_size=total + 1)
        engine.add_event_handler(Events.ITERATION_STARTED, scheduler)
        objects["scheduler"] = scheduler
    if not resumable:
        engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "history", []))
    elif resume_stage(engine, stage, epochs, objects, loader.generator, loader.sampler):
        return engine
    if on_first_step is not None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda _: on_first_step())
    with progress(engine, description), tensorboard_logging(engine, description.split()[0], optimizer):
        engine.run(loader, max_epochs=epochs)
    _share_buffers(model)
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
    confidence_loss: nn.Module | None = None,
    confidence_weight: float = 1.0,
    contrastive: nn.Module | None = None,
    contrastive_weight: float = 0.5,
    contrastive_labels: bool = True,
    optimizer: Callable[..., torch.optim.Optimizer] = gin.REQUIRED,
    seed: int = 0,
    on_first_step: Callable[[], None] | None = None,
) -> Engine:
    """Train ``model`` on labeled images with ``loss`` (cross-entropy by default, or a balanced
    loss built from the split's class counts, see :func:`make_loss`) on augmented batches drawn
    by ``sampler`` (``instance``, ``class_balanced``, ``sqrt`` or ``progressive``).

    A model with a confidence head (``Network.confidence``) trains it at the same time with
    ``confidence_weight · confidence_loss`` (e.g. :class:`EvidentialLoss`) on the same features.
    ``contrastive`` (e.g. :class:`SupConLoss`) adds ``contrastive_weight`` times a contrastive
    term on the projections of that view and a second augmented view of the batch, with the
    labels (SupCon, Khosla et al. 2020), or without them (``contrastive_labels=False``: each
    image's only positive is its other view, SimCLR's self-supervised term beside the
    classifier's, which keeps features the labels do not ask for).
    """
    check_model_input(images, model)
    model.to(device)
    opt = optimizer(model.parameters())
    criterion = make_loss(loss, images, getattr(model, "num_classes", 0))
    head_loss = _confidence_loss(model, confidence_loss, "train")
    for module in (criterion, head_loss):
        if isinstance(module, nn.Module):
            module.to(device)

    outputs = ("logits",) + ("evidence",) * (head_loss is not None)
    net = data_parallel(model, outputs + ("projected",) * (contrastive is not None))

    def update(engine: Engine, batch) -> dict[str, float]:
        x, y = _batch(batch, device, net, augment)
        # encode, not forward: the projector's BatchNorm statistics follow the features even
        # though only the classifier is trained here. With a contrastive term, a second view
        # is augmented and encoded after the first, in the same call.
        outs = net(*([x, x] if contrastive is not None else [x]), augment=augment)
        out = outs[0]
        value = criterion(out["logits"], y)
        if head_loss is not None:
            value = value + confidence_weight * head_loss(out["evidence"], y)
        if contrastive is not None:
            value = value + contrastive_weight * contrastive(out["projected"], outs[1]["projected"],
                                                             y if contrastive_labels else None)
        accuracy = (out["logits"].argmax(1) == y).float().mean().item()
        return _step(opt, value) | {"accuracy": accuracy}

    loader = _loader(images, batch_size, sampler=sampler, drop_last=True, seed=seed, epochs=epochs)
    engine = Engine(update)
    _follow_epochs(engine, criterion)
    _follow_epochs(engine, head_loss)
    return _fit(engine, model, loader, opt, epochs, f"train {images.name}", on_first_step,
                tracked=("loss", "accuracy"))


def _confidence_loss(model: nn.Module, loss: nn.Module | None, graph: str) -> nn.Module | None:
    """The loss of the model's confidence head; a head without a loss (or the reverse) is an
    error, since one of the two would silently do nothing."""
    has_head = getattr(model, "confidence", None) is not None
    if has_head and loss is None:
        raise ValueError(f"the model has a confidence head but {graph}.confidence_loss is not set: "
                         f"bind {graph}.confidence_loss = @EvidentialLoss() (or drop Network.confidence)")
    if loss is not None and not has_head:
        raise ValueError(f"{graph}.confidence_loss is set but the model has no confidence head: "
                         "bind Network.confidence = @EvidentialHead")
    return loss


@gin.configurable(denylist=["student", "teacher", "images", "augment", "device"])
def distill(
    student: nn.Module,
    teacher: nn.Module,
    images: ImageSet,
    augment: nn.Module,
    device: torch.device,
    loss: nn.Module = gin.REQUIRED,
    epochs: int = 80,
    batch_size: int = 64,
    sampler: str = "class_balanced",
    confidence_loss: nn.Module | None = None,
    confidence_weight: float = 1.0,
    optimizer: Callable[..., torch.optim.Optimizer] = gin.REQUIRED,
    align_weights: bool = False,
    seed: int = 0,
) -> Engine:
    """Teach ``student`` (grown classifier) from labels and pseudo-labels in ``images`` and
    from ``teacher``'s old-class outputs on the same augmented batch. A confidence head grown
    with the classifier learns the new classes from the same labels (``confidence_loss``).
    ``sampler`` as in :func:`train`: class-balanced by default, so that the rarest labeled
    classes are not drowned by thousands of pseudo-labels (chosen on the suite, docs/suite.md).
    ``align_weights``: after training, scale the classifier rows the teacher does not have to
    the old rows' mean norm (weight aligning, :meth:`GrowingLinear.align`); the factor is
    ``engine.state.align_gamma``."""
    student.to(device)
    teacher.to(device).eval()
    opt = optimizer(student.parameters())
    head_loss = _confidence_loss(student, confidence_loss, "distill")

    # here, after the student grew: DDP holds its parameters
    net = data_parallel(student, ("logits",) if head_loss is None else ("logits", "evidence"))

    def update(engine: Engine, batch) -> dict[str, float]:
        x, y = _batch(batch, device, net, augment)
        x = augment(x)
        with torch.no_grad():
            teacher_logits = teacher(x)
        if head_loss is None:
            return _step(opt, loss(net(x, logits_only=True)[0], y, teacher_logits))
        out = net(x)[0]
        value = loss(out["logits"], y, teacher_logits) + confidence_weight * head_loss(out["evidence"], y)
        return _step(opt, value)

    loader = _loader(images, batch_size, sampler=sampler, drop_last=True, seed=seed)
    engine = Engine(update)
    _follow_epochs(engine, head_loss)
    engine = _fit(engine, student, loader, opt, epochs, f"distill {images.name}", None)
    # after _fit, also when the stage resumed finished: the checkpoint holds the trained rows
    engine.state.align_gamma = student.classifier.align(teacher.num_classes) if align_weights else None
    if align_weights:
        log.info(f"weight aligning: new classifier rows scaled by {engine.state.align_gamma:.3f}")
    return engine


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
    cosine: bool = False,
    max_unlabeled: int | None = None,
    seed: int = 0,
) -> Engine:
    """Representation learning on labeled and unlabeled images together before clustering, as
    GCD does (Vaze et al., CVPR 2022): ``loss`` (e.g. :class:`GCDContrastive`) on the projections
    of two augmented views, plus ``ce_weight`` · cross-entropy on the labeled images.

    ``max_unlabeled``: train on at most this many of the unlabeled images, drawn at random by
    ``seed`` (None: all of them). What bounds the step's time on a long stream."""
    if max_unlabeled is not None and max_unlabeled < 1:
        raise ValueError(f"adapt.max_unlabeled must be a positive number of images or None, "
                         f"got {max_unlabeled}")
    if max_unlabeled is not None and len(unlabeled) > max_unlabeled:
        drawn = np.sort(np.random.default_rng(seed).choice(len(unlabeled), max_unlabeled, replace=False))
        unlabeled = unlabeled.subset(drawn, f"{unlabeled.name}[{max_unlabeled}]")
    model.to(device)
    opt = optimizer(model.parameters())
    both = ImageSet(
        concat_images([labeled.images, unlabeled.images]),
        torch.cat([labeled.targets, torch.full((len(unlabeled),), -1)]),
        labeled.classes, f"{labeled.name}+{unlabeled.name}",
    )

    net = data_parallel(model, ("projected", "logits") if ce_weight else ("projected",))

    def update(engine: Engine, batch) -> dict[str, float]:
        x, y = _batch(batch, device, net, augment)
        is_labeled = y >= 0
        first, second = net(*_views(augment, x, 2))
        value = loss(first["projected"], second["projected"], y, is_labeled)
        if ce_weight and idist.get_world_size() > 1:
            value = value + ce_weight * _labeled_cross_entropy(first["logits"], y, is_labeled)
        elif is_labeled.any() and ce_weight:
            value = value + ce_weight * F.cross_entropy(first["logits"][is_labeled], y[is_labeled])
        return _step(opt, value)

    loader = _loader(both, batch_size, sampler="instance", drop_last=True, seed=seed)
    return _fit(Engine(update), model, loader, opt, epochs, f"adapt {both.name}", None, cosine)


@gin.configurable(denylist=["model", "images", "augment", "device"])
def pretrain(
    model: nn.Module,
    images: ImageSet,
    augment: nn.Module,
    device: torch.device,
    loss: nn.Module = gin.REQUIRED,
    epochs: int = 20,
    batch_size: int = 128,
    optimizer: Callable[..., torch.optim.Optimizer] = gin.REQUIRED,
    seed: int = 0,
) -> Engine:
    """Self-supervised start before supervised training: SimCLR (Chen et al., ICML 2020), i.e.
    ``loss`` (:class:`SupConLoss` without labels is NT-Xent) between the projections of two
    augmented views of each image, labels unused, so labeled and unlabeled images train alike."""
    check_model_input(images, model)
    model.to(device)
    opt = optimizer(model.parameters())

    net = data_parallel(model, ("projected",))

    def update(engine: Engine, batch) -> dict[str, float]:
        x, _ = _batch(batch, device, net, augment)
        first, second = (out["projected"] for out in net(*_views(augment, x, 2)))
        return _step(opt, loss(first, second))

    loader = _loader(images, batch_size, sampler="instance", drop_last=True, seed=seed)
    return _fit(Engine(update), model, loader, opt, epochs, f"pretrain {images.name}", None)
