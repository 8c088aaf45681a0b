"""Graphs: Ignite engines built from the components they are given."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.cache import FeatureCache
from components.data import BatchAugment, ImageSet
from components.losses import DistillLoss
from components.models import Network, SmallConvNet
from components.pool import SamplePool
from components.scores import max_softmax
from graphs.encode import encode
from graphs.evaluate import evaluate
from graphs.handlers import RunDir
from graphs.lifecycle import _adjust_known, _lower_discovered
from graphs.online import online
from graphs.train import adapt, distill, train

CPU = torch.device("cpu")


def _images(n: int = 24, classes: int = 3, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % classes
    images = torch.randint(0, 40, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    for c in range(classes):  # one bright row per class: learnable in a few steps
        images[targets == c, :, 2 * c + 1] = 250
    return ImageSet(images, targets, [str(c) for c in range(classes)], "tiny")


def _net(classes: int = 3) -> Network:
    torch.manual_seed(0)
    return Network(SmallConvNet(in_channels=1, width=4), classes)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def test_online_stops_when_the_pool_fires():
    logits = torch.zeros(10, 3)
    logits[:, 0] = torch.tensor([9, 9, 0, 9, 0, 0, 9, 0, 0, 0], dtype=torch.float)  # 0 = unsure
    stream = {"logits": logits.numpy(), "ids": np.arange(10)}
    pool = SamplePool(trigger_size=3, threshold=0.5)
    position, scores = online(stream, max_softmax, pool, batch_size=2)
    # unsure samples are 2, 4, 5: the pool fills in the batch [4, 6), and the stream stops there
    assert position == 6 and len(scores) == 6
    assert pool.ids.tolist() == [2, 4, 5]
    # the next call resumes where the last one stopped and runs to the end of the stream
    pool.remove(pool.ids)
    pool.new_round(1)
    position, scores = online(stream, max_softmax, pool, start=position, batch_size=2)
    assert position == 10 and len(scores) == 4 and pool.ids.tolist() == [7, 8, 9]


def test_online_keeps_samples_it_may_not_admit_out_of_the_pool():
    """``admit`` (the continual loop's off-domain flags): a sample marked False is scored and
    counted as read but never pooled, however unsure the model is of it; the trigger then
    waits for samples it may pool."""
    logits = torch.zeros(10, 3)
    logits[:, 0] = torch.tensor([9, 0, 0, 9, 0, 0, 9, 0, 0, 0], dtype=torch.float)  # 0 = unsure
    stream = {"logits": logits.numpy(), "ids": np.arange(10)}
    admit = np.ones(10, bool)
    admit[[1, 2, 4]] = False  # three unsure samples off the domain
    pool = SamplePool(trigger_size=3, threshold=0.5)
    position, scores = online(stream, max_softmax, pool, batch_size=2, admit=admit)
    # without admit the pool would fire in the batch [4, 6) on 1, 2, 4 (and 5); with it, in the
    # batch [8, 10) on 5, 7, 8 (and 9)
    assert pool.ready and pool.ids.tolist() == [5, 7, 8, 9] and position == 10 and len(scores) == 10


def test_encode_caches_and_refuses_stale_entries(tmp_path):
    images, model, augment = _images(), _net(), BatchAugment()
    cache = FeatureCache(str(tmp_path))
    first = encode(model, images, augment, cache, CPU)
    assert set(first) == {"features", "projected", "logits", "targets", "ids"}
    assert first["logits"].shape == (24, 3) and first["ids"].tolist() == list(range(24))
    again = encode(model, images, augment, cache, CPU)
    assert (cache.hits, cache.misses) == (1, 1)
    np.testing.assert_array_equal(first["features"], again["features"])
    with torch.no_grad():
        model.classifier.bias[0] += 1.0  # a changed model must not reuse the old file
    changed = encode(model, images, augment, cache, CPU)
    assert cache.misses == 2
    assert not np.allclose(changed["logits"], first["logits"])
    tapped = Network(model.backbone, 3, taps=(3,))  # same weights, one more array: not the same entry
    tapped.load_state_dict(model.state_dict())
    assert set(encode(tapped, images, augment, cache, CPU)) == set(first) | {"tap3"} and cache.misses == 3


def test_train_learns_and_calls_the_first_step_hook():
    images, model, calls = _images(48), _net(), []
    engine = train(model, images, BatchAugment(), CPU, epochs=15, batch_size=16,
                   sampler="class_balanced", optimizer=_sgd, on_first_step=lambda: calls.append(1))
    assert calls == [1]
    assert engine.state.iteration == 15 * 3
    model.eval()
    with torch.no_grad():
        accuracy = (model(BatchAugment()(images.images)).argmax(1) == images.targets).float().mean()
    assert accuracy > 0.9


def test_adapt_trains_on_labeled_and_unlabeled_images():
    labeled, unlabeled, model = _images(16), _images(16, seed=1), _net()
    before = [p.detach().clone() for p in model.projector.parameters()]
    from components.losses import GCDContrastive

    engine = adapt(model, labeled, unlabeled, BatchAugment(pad=1), CPU, loss=GCDContrastive(),
                   epochs=2, batch_size=8, optimizer=_sgd)
    assert engine.state.iteration == 2 * 4  # 32 images in batches of 8
    assert any(not torch.equal(b, p) for b, p in zip(before, model.projector.parameters(), strict=True))


def test_adapt_max_unlabeled_bounds_the_unlabeled_images_it_trains_on():
    from components.losses import GCDContrastive

    labeled, unlabeled = _images(16), _images(40, seed=1)
    engine = adapt(_net(), labeled, unlabeled, BatchAugment(pad=1), CPU, loss=GCDContrastive(),
                   epochs=1, batch_size=8, optimizer=_sgd, max_unlabeled=8)
    assert engine.state.iteration == 3  # 16 labeled + 8 of the 40 unlabeled, in batches of 8
    with pytest.raises(ValueError, match="max_unlabeled must be a positive"):
        adapt(_net(), labeled, unlabeled, BatchAugment(pad=1), CPU, loss=GCDContrastive(),
              epochs=1, batch_size=8, optimizer=_sgd, max_unlabeled=0)


def test_distill_teaches_new_classes_and_keeps_old_rows_shape():
    images = _images(60, classes=4)
    old = ImageSet(images.images[images.targets < 3], images.targets[images.targets < 3],
                   images.classes[:3], "old")
    teacher = _net(3)
    train(teacher, old, BatchAugment(), CPU, epochs=10, batch_size=15, optimizer=_sgd)
    student = _net(3)
    student.load_state_dict(teacher.state_dict())
    student.classifier.grow(1)
    distill(student, teacher, images, BatchAugment(), CPU, loss=DistillLoss(), epochs=15,
            batch_size=15, sampler="instance", optimizer=_sgd)
    student.eval()
    with torch.no_grad():
        pred = student(BatchAugment()(images.images)).argmax(1)
    assert student.num_classes == 4
    assert (pred[images.targets == 3] == 3).float().mean() > 0.8  # learned the new class
    assert (pred[images.targets < 3] == images.targets[images.targets < 3]).float().mean() > 0.8


def test_distill_aligns_the_grown_rows_after_training():
    images = _images(60, classes=4)
    teacher = _net(3)
    student = _net(3)
    student.classifier.grow(1)
    with torch.no_grad():
        student.classifier.weight[3] *= 5.0  # a new row far larger than the old ones
    engine = distill(student, teacher, images, BatchAugment(), CPU, loss=DistillLoss(), epochs=1,
                     batch_size=15, sampler="instance", optimizer=_sgd, align_weights=True)
    norms = student.classifier.weight.detach().norm(dim=1)
    assert 0 < engine.state.align_gamma < 1
    assert norms[3].item() == pytest.approx(norms[:3].mean().item(), rel=1e-5)
    plain = _net(3)
    plain.classifier.grow(1)
    engine = distill(plain, teacher, images, BatchAugment(), CPU, loss=DistillLoss(), epochs=1,
                     batch_size=15, sampler="instance", optimizer=_sgd)
    assert engine.state.align_gamma is None


def test_evaluate_matches_new_clusters_by_hungarian():
    targets = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    predicted = np.array([0, 0, 1, 1, 3, 3, 2, 2])  # new classes 2, 3 found under swapped ids
    logits = np.eye(4, dtype=np.float32)[predicted]
    result = evaluate({"logits": logits, "targets": targets}, n_old=2, train_counts=[150, 10],
                      batch_size=3)
    assert result["accuracy"]["all"] == 1.0 and result["accuracy"]["new"] == 1.0
    assert result["shots"]["many"] == 1.0 and result["shots"]["few"] == 1.0
    assert np.isnan(result["shots"]["medium"])


def test_evidential_head_trains_beside_the_classifier_and_grows_with_it():
    from components.losses import EvidentialLoss
    from components.models import EvidentialHead
    from components.scores import EvidentialUncertainty

    images = _images(48)
    torch.manual_seed(0)
    model = Network(SmallConvNet(in_channels=1, width=4), 3, confidence=EvidentialHead)
    with pytest.raises(ValueError, match="confidence_loss"):  # a head nobody trains
        train(model, images, BatchAugment(), CPU, epochs=1, optimizer=_sgd)
    with pytest.raises(ValueError, match="no confidence head"):  # a loss with nothing to train
        train(_net(), images, BatchAugment(), CPU, epochs=1, optimizer=_sgd, confidence_loss=EvidentialLoss())
    x = BatchAugment()(images.images)
    model.eval()
    with torch.no_grad():
        before = EvidentialUncertainty()(model.encode(x)).mean()
    train(model, images, BatchAugment(), CPU, epochs=15, batch_size=16, optimizer=_sgd,
          confidence_loss=EvidentialLoss(anneal_epochs=5))
    model.eval()
    with torch.no_grad():
        out = model.encode(x)
    # the head learned evidence for the right class: confident (low K / S) and correct
    assert EvidentialUncertainty()(out).mean() < before
    assert (out["evidence"].argmax(1) == images.targets).float().mean() > 0.9
    assert (out["logits"].argmax(1) == images.targets).float().mean() > 0.9
    model.grow(2)
    assert model.encode(x)["evidence"].shape == (48, 5) and model.num_classes == 5


def test_pretrain_learns_views_of_one_image_apart_from_other_images():
    from components.losses import SupConLoss
    from graphs.train import pretrain

    images, model = _images(64), _net()
    augment = BatchAugment(pad=1)
    engine = pretrain(model, images, augment, CPU, loss=SupConLoss(0.5), epochs=1, batch_size=32,
                      optimizer=_sgd)
    first = engine.state.output["loss"]
    engine = pretrain(model, images, augment, CPU, loss=SupConLoss(0.5), epochs=20, batch_size=32,
                      optimizer=_sgd)
    assert engine.state.iteration == 20 * 2
    assert engine.state.output["loss"] < first  # NT-Xent went down: views found each other


def test_train_with_a_supcon_term_moves_the_projector_too():
    from components.losses import SupConLoss

    images, model = _images(48), _net()
    before = [p.detach().clone() for p in model.projector.parameters()]
    train(model, images, BatchAugment(), CPU, epochs=3, batch_size=16, optimizer=_sgd)
    unchanged = all(torch.equal(b, p) for b, p in zip(before, model.projector.parameters(), strict=True))
    assert unchanged  # cross-entropy alone never reaches the projector's weights
    train(model, images, BatchAugment(), CPU, epochs=3, batch_size=16, optimizer=_sgd,
          contrastive=SupConLoss(), contrastive_weight=0.5)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.projector.parameters(), strict=True))


def test_train_contrastive_term_without_labels_is_simclr():
    """``contrastive_labels=False`` hands the contrastive term no labels, so each image's only
    positive is its own other view (SimCLR) and not every image of its class (SupCon)."""
    from components.losses import SupConLoss

    class Recording(SupConLoss):
        def forward(self, view1, view2, labels=None):
            self.seen.append(labels)
            return super().forward(view1, view2, labels)

    images = _images(32)
    for with_labels in (True, False):
        term = Recording()
        term.seen = []
        train(_net(), images, BatchAugment(), CPU, epochs=1, batch_size=16, optimizer=_sgd,
              sampler="instance", contrastive=term, contrastive_labels=with_labels)
        assert len(term.seen) == 2
        assert all((labels is not None) == with_labels for labels in term.seen)


def test_training_curves_go_to_tensorboard_when_asked(tmp_path):
    import gin
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import graphs.handlers  # noqa: F401  (registers tensorboard)

    gin.bind_parameter("tensorboard.log_dir", str(tmp_path / "tb"))
    engine = train(_net(), _images(48), BatchAugment(), CPU, epochs=2, batch_size=16, optimizer=_sgd)
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    losses = events.Scalars("train/loss")
    assert len(losses) == engine.state.iteration == 6
    assert events.Scalars("train/accuracy") and events.Scalars("train/lr/group_0")


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_autocast_and_channels_last_are_options_of_every_training_graph(channels_last):
    """``data_parallel.bf16``: the convolutions run in bfloat16 under autocast, the losses see
    float32 outputs and the weights stay float32; ``data_parallel.channels_last``: NHWC weights
    and batches. The model still learns (chance is 1/3 on these three classes)."""
    import gin

    model, images = _net(), _images(48)
    seen: list[tuple[torch.dtype, bool]] = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    def record(module, inputs, output):  # a one-channel input is both layouts: look at the output
        if module.training:
            seen.append((output.dtype, output.is_contiguous(memory_format=torch.channels_last)))

    conv.register_forward_hook(record)
    with gin.unlock_config():
        gin.bind_parameter("data_parallel.bf16", True)
        gin.bind_parameter("data_parallel.channels_last", channels_last)
    try:
        engine = train(model, images, BatchAugment(), CPU, epochs=15, batch_size=16, optimizer=_sgd)
    finally:
        gin.clear_config()
    assert seen and all(dtype == torch.bfloat16 for dtype, _ in seen)  # autocast ran the convolutions
    assert all(layout == channels_last for _, layout in seen)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    wide = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1][-1]
    assert wide.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert np.isfinite(engine.state.output["loss"])
    model.eval()
    with torch.no_grad():
        predicted = model(BatchAugment().eval()(images.images)).argmax(1)
    assert (predicted == images.targets).float().mean() > 0.6


def test_torch_compile_is_an_option_of_every_training_graph():
    """``data_parallel.compile = True``: every training graph's forward (augmentation, model,
    outputs) goes through ``torch.compile(**data_parallel.compile_options)``. The backend here
    records the graphs dynamo hands it and runs them as they are: inductor, the default, spends
    about 20 s compiling even this model on these CPUs (``bench/torch_compile.py`` measures it).
    The model's convolutions are in the compiled graphs, and the model still learns."""
    import gin

    compiled: list[torch.fx.GraphModule] = []

    def recording(graph: torch.fx.GraphModule, example_inputs):
        compiled.append(graph)
        return graph.forward

    model, images = _net(), _images(48)
    gin.parse_config("data_parallel.compile = True")
    with gin.unlock_config():
        gin.bind_parameter("data_parallel.compile_options", {"backend": recording})
    try:
        engine = train(model, images, BatchAugment(), CPU, epochs=15, batch_size=16, optimizer=_sgd)
    finally:
        gin.clear_config()
        torch._dynamo.reset()
    calls = {str(node.target) for graph in compiled for node in graph.graph.nodes}
    assert compiled and any("conv2d" in call for call in calls), calls
    assert np.isfinite(engine.state.output["loss"])
    model.eval()
    with torch.no_grad():
        predicted = model(BatchAugment().eval()(images.images)).argmax(1)
    assert (predicted == images.targets).float().mean() > 0.6


def test_adjust_known_shifts_the_known_outputs_by_the_tau_the_held_out_images_choose(tmp_path):
    """The lifecycle's logit adjustment: a student biased towards its head class (class 0, 1,000
    labeled images against 1 and 1) gets the τ · centred log-prior shift the held-out images
    choose, through the known outputs' biases only (weights and the discovered outputs stay),
    and the adjusted model is saved. Without held-out images the student stays and the run
    says why."""
    student = _net(classes=5)  # 3 known classes, 2 discovered (never taught)
    train(student, _images(48), BatchAugment(), CPU, epochs=15, batch_size=16, optimizer=_sgd)
    val = _images(seed=1)
    with torch.no_grad():
        student.classifier.bias[0] += 8.0  # a bit more than τ = 1 takes off class 0 against 1 and 2
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cache, run_dir = FeatureCache(root=tmp_path / "cache"), RunDir(tmp_path / "run")
    protocol = type("Protocol", (), {"val": val, "n_old": 3, "train_counts": [1000, 1, 1]})()
    notes = []
    entry = _adjust_known(run_dir, student, protocol, BatchAugment(), cache, CPU, notes)
    assert entry["tau"] > 0 and max(entry["held_out"]) > entry["held_out_before"] and not notes
    shift = before["classifier.bias"] - student.state_dict()["classifier.bias"]
    prior = np.log([1000, 1, 1]) - np.log([1000, 1, 1]).mean()
    assert shift[:3].tolist() == pytest.approx((entry["tau"] * prior).tolist(), abs=1e-5)
    assert torch.equal(shift[3:], torch.zeros(2))
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items() if k != "classifier.bias")
    assert [p.name.split("_")[0] for p in (tmp_path / "run" / "checkpoints").glob("*.pt")] == ["adjusted"]
    protocol.val = None
    assert _adjust_known(run_dir, student, protocol, BatchAugment(), cache, CPU, notes) is None
    assert "no held-out known-class images" in notes[0]


def test_lower_discovered_bounds_what_the_new_outputs_claim_of_held_out_images(tmp_path):
    """The lifecycle's last step: the discovered outputs (here biased to claim every held-out
    known-class image) are lowered through their biases until at most the rate's share of the
    held-out images is predicted as one; the known outputs and all weights stay; the lowered
    model is saved. Without held-out images the student stays and the run says why."""
    val, student = _images(), _net(classes=5)  # 3 known classes, 2 discovered
    with torch.no_grad():
        student.classifier.bias[3:] += 10.0
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cache, run_dir = FeatureCache(root=tmp_path / "cache"), RunDir(tmp_path / "run")
    protocol = type("Protocol", (), {"val": val, "n_old": 3})()
    notes = []
    entry = _lower_discovered(run_dir, student, protocol, BatchAugment(), cache, CPU, 0.25, False, notes)
    assert entry["claimed_before"] == 1.0 and min(entry["offset"]) > 5.0 and not notes
    after = encode(student, val, BatchAugment(), cache, CPU)["logits"].argmax(1)
    assert (after >= 3).sum() <= 6 and entry["claimed_after"] == (after >= 3).mean()  # ⌊0.25 · 24⌋
    state = student.state_dict()
    shift = before["classifier.bias"] - state["classifier.bias"]
    assert torch.equal(shift[:3], torch.zeros(3))
    assert shift[3:].tolist() == pytest.approx(entry["offset"])
    assert all(torch.equal(before[k], v) for k, v in state.items() if k != "classifier.bias")
    assert [p.name.split("_")[0] for p in (tmp_path / "run" / "checkpoints").glob("*.pt")] == ["offset"]
    protocol.val = None
    assert _lower_discovered(run_dir, student, protocol, BatchAugment(), cache, CPU, 0.25, False,
                             notes) is None
    assert "no held-out known-class images" in notes[0]
