"""The continual loop: the model keeps updating itself over the whole stream.

Round 0 trains model v0 on the long-tailed labeled classes and fills the exemplar memory with
them. Every later round

1. goes **online** from where the stream stopped, re-scoring with the current model, until
   ``pool.trigger_size`` new samples were pooled or the stream ends;
2. **discovers**: learns a representation on a copy of the current model (memory + the stream
   seen so far), clusters the pool anchored by every known class with the number of new
   classes estimated (0 included), and judges each cluster (``accept``); rejected samples stay
   in the pool and age out after ``pool_age`` rounds;
3. **grows and distills** a student from the copy on the memory plus the accepted clusters'
   pseudo-labels, with the current model as the teacher (classes discovered in round r are old
   classes in round r + 1);
4. **promotes** the student only if the ``gate`` passes on held-out known-class images (never
   the test set), after dropping the new outputs that took those images when it did not pass as
   it was (:meth:`PromotionGate.select`; their samples stay in the pool); a promoted student
   becomes version ``v<n>`` under ``versions/``, its classes
   join the memory, and the pool threshold and temperature are re-fitted for it;
5. **measures** the current model on the test images of the classes seen so far (one Hungarian
   assignment), one row of the accuracy matrix.

The stream's end triggers a final round on what is pooled, then (``consolidate``) a last pass
that labels the discovered classes again from everything seen: a cluster accepted early, from a
small pool, may have mixed two classes for good; re-clustered in one go, over the whole
stream's samples the model assigns to them, they come out purer (docs/loop.md measures it). The
loop is an Ignite ``Engine``
with one iteration per round and events of its own (:class:`LoopEvents`); after every round
its state (round, stream position, pool, memory, class table, the current model, the rows so
far) is saved with Ignite's ``Checkpoint``, then the version it names is written, so a run
started again on the same run folder continues after the last finished round and ends as an
uninterrupted run would. Every round re-seeds from ``(seed, round)``, which is what makes that
possible. A finished run started again writes nothing.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import gin
import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, EventEnum, Events
from ignite.handlers import Checkpoint
from ignite.utils import manual_seed
from torch import nn

from components.acceptance import ClusterAcceptance, PromotionGate
from components.cache import FeatureCache
from components.data import ImageSet, ProtocolData, concat_images, take_images
from components.domain import InputComplexity
from components.kmeans import KMeansResult, confident
from components.memory import LABELED, STREAM, ExemplarMemory
from components.metrics import (
    cluster_truth,
    continual_summary,
    grouped_accuracy,
    own_output_accuracy,
    where_classes_go,
)
from components.pool import SamplePool
from components.scores import Score
from graphs.consolidate import consolidate as relabel_discovered
from graphs.consolidate import labeler_arguments, left_to_labeled
from graphs.encode import encode
from graphs.handlers import (
    CheckedDiskSaver,
    RunDir,
    RunFailure,
    describe,
    drop_stage_scope,
    finite_json,
    load_checkpoint,
    log,
    stage_scope,
)
from graphs.novelty import TEN_PERCENT_FALSE_ALARMS, scaled, temperature_of
from graphs.online import online, score_outputs
from graphs.train import adapt, distill, train


class LoopEvents(EventEnum):
    """Fired by the continual loop's engine within a round."""

    POOL_READY = "pool_ready"  # the trigger fired, or the stream ended with samples pooled
    CLUSTERS_JUDGED = "clusters_judged"  # every cluster was accepted or rejected
    PROMOTED = "promoted"  # a student became the current model
    KEPT = "kept"  # the gate kept the current model


class LoopState:
    """Everything a round needs from the ones before, saved after every round: the current
    model's weights with it, so a version folder is only ever written from saved state."""

    def __init__(self, pool: SamplePool, memory: ExemplarMemory) -> None:
        self.pool, self.memory = pool, memory
        self.model: nn.Module | None = None  # the current version
        self.weights: dict | None = None  # its weights, as loaded, until the model is rebuilt
        self.elapsed = 0.0  # seconds spent on the finished rounds, across restarts
        self.round = 0  # the last finished round
        self.position = 0  # stream samples consumed
        self.version = 0
        self.threshold: float | None = None
        self.temperature = 1.0
        self.classes: list[dict] = []  # the class table: output id -> name, origin, ...
        self.rounds: list[dict] = []  # one record per finished round
        self.trace: list[list[int]] = []  # (stream position, pool size) after every online batch
        self.done = False

    def state_dict(self) -> dict:
        return {"round": self.round, "position": self.position, "version": self.version,
                "model": self.model.state_dict(), "elapsed": self.elapsed,
                "threshold": self.threshold, "temperature": self.temperature, "done": self.done,
                "classes": json.dumps(self.classes), "rounds": json.dumps(self.rounds),
                "trace": torch.tensor(self.trace, dtype=torch.long).reshape(-1, 2),
                "pool": self.pool.state_dict(), "memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.round, self.position = int(state["round"]), int(state["position"])
        self.version, self.done = int(state["version"]), bool(state["done"])
        self.threshold, self.temperature = state["threshold"], float(state["temperature"])
        self.classes, self.rounds = json.loads(state["classes"]), json.loads(state["rounds"])
        self.trace = state["trace"].tolist()
        self.weights, self.elapsed = state["model"], float(state["elapsed"])
        self.pool.load_state_dict(state["pool"])
        self.memory.load_state_dict(state["memory"])


@gin.configurable(denylist=["run_dir"])
def continual(
    run_dir: RunDir,
    data: Callable[[], ProtocolData] = gin.REQUIRED,
    model: Callable[..., nn.Module] = gin.REQUIRED,
    augment: nn.Module = gin.REQUIRED,
    score: Score | Callable[[torch.Tensor], torch.Tensor] = gin.REQUIRED,
    pool: SamplePool = gin.REQUIRED,
    labeler: Callable = gin.REQUIRED,
    cache: FeatureCache = gin.REQUIRED,
    memory: ExemplarMemory | None = None,
    accept: ClusterAcceptance | None = None,
    gate: PromotionGate | None = None,
    threshold: Callable = TEN_PERCENT_FALSE_ALARMS,
    temperature_scaling: bool = True,
    representation: Callable[..., object] | None = adapt,
    cluster_on: str = "projected",
    keep_fraction: float = 1.0,
    pseudo_labels: str = "cluster",
    score_fit: str = "memory",
    pool_age: int = 2,
    max_rounds: int = 30,
    consolidate: bool = True,
    consolidation_stability: bool = True,
    domain: InputComplexity | None = None,
    pool_off_domain: bool = True,
    consolidation_fixed_anchors: bool = True,
    consolidation_added: int = 0,
    consolidation_territory: float = 0.75,
    consolidation_inputs: bool = False,
    consolidation_k: str = "density",
    seed: int = 0,
) -> dict:
    """Run the continual loop of the module docstring over ``data()``'s whole stream and return
    (and write) its metrics; see :class:`ContinualLoop` for the parameters."""
    loop = ContinualLoop(
        run_dir, data(), model, augment, score, pool, labeler, cache,
        ExemplarMemory() if memory is None else memory, ClusterAcceptance() if accept is None else accept,
        PromotionGate() if gate is None else gate,
        threshold, temperature_scaling, representation, cluster_on, keep_fraction, pool_age,
        max_rounds, seed, consolidate, consolidation_stability, pseudo_labels, score_fit, domain,
        pool_off_domain, consolidation_fixed_anchors, consolidation_added, consolidation_territory,
        consolidation_inputs, consolidation_k)
    return loop.run()


def pseudo_label_mask(result: KMeansResult, clusters: list[int], first: int, keep_fraction: float = 1.0,
                      core: bool = False) -> np.ndarray:
    """Which pooled samples become pseudo-labels: those of the accepted ``clusters``, the
    ``keep_fraction`` nearest each centroid (:func:`components.kmeans.confident`), and with
    ``core`` only those in the dense group that seeded their cluster (``result.core``). A
    cluster with no member in its group (k-means moved the group elsewhere) keeps its members:
    it was accepted on them."""
    keep = confident(result, keep_fraction, first=first) & np.isin(result.labels, clusters)
    if not core:
        return keep
    if result.core is None:
        raise ValueError("core pseudo-labels need the labeler's dense groups (KMeansResult.core): "
                         "estimate k by density, or take the clusters' members")
    dense = keep & result.core
    for c in clusters:
        members = keep & (result.labels == c)
        if not (dense & members).any():
            dense |= members
    return dense


class ContinualLoop:
    """The continual loop's pieces and the state it carries from round to round.

    ``labeler(pool, memory features, memory classes, n_known)`` clusters the pool (it must
    offer ``geometry`` and ``cluster``, as :class:`components.kmeans.SemiSupervisedKMeans` does,
    for ``accept`` to measure stability); ``cluster_on`` picks ``"projected"`` or ``"features"``;
    ``keep_fraction`` of each accepted cluster (nearest its centroid) become pseudo-labels;
    ``pseudo_labels="core"`` keeps only those in the dense group that seeded the cluster (the
    labeler must estimate k by density, ``KMeansResult.core``): k-means gives a group the sparse
    samples around it too, and a group of one class can become a cluster of two
    (:func:`pseudo_label_mask`);
    ``score_fit`` says what a score that needs fitting (Mahalanobis, kNN) is fitted on:
    ``"memory"``, the exemplars; ``"assigned"``, the labeled classes' exemplars and, for each
    discovered class, every stream sample seen so far that the current model assigns to it
    (its exemplars when it has none), since a discovered class's exemplars come from its dense
    pseudo-labeled core and understate how far it spreads (:meth:`_score_fit_outputs`);
    ``pool_age`` is how many rounds a rejected sample may wait in the pool; ``consolidate``
    relabels the discovered classes at the stream's end (:meth:`_consolidate`), and with
    ``consolidation_stability`` drops the outputs whose relabeled cluster fails ``accept``'s
    stability test, and with ``consolidation_fixed_anchors`` clusters with the labeled classes'
    centroids fixed at their exemplars' means (``SemiSupervisedKMeans.fixed_old``), and with
    ``consolidation_added`` > 0 may add up to that many outputs: a group of candidates the
    clustering gives a labeled class from farther than ``consolidation_territory`` neighbouring-
    class spacings gets a cluster of its own, and a stable cluster no output matches becomes a
    class "discovered in consolidation" (:func:`graphs.consolidate.far_groups`); ``domain``
    (e.g. :class:`components.domain.InputComplexity`), fitted on the held-out known-class
    images, flags the samples that are off the domain: with
    ``pool_off_domain`` they may be pooled and ``accept`` judges each cluster by how many of its
    members are (``max_off_domain``); without it they never enter the pool.
    ``consolidation_k`` is how many clusters consolidation makes: ``"outputs"``, one per
    discovered output; ``"density"``, as many as the candidates hold
    (:func:`graphs.consolidate.estimate_k`), outputs no cluster matches dropped and stable
    clusters no output matches added. ``consolidation_inputs`` writes consolidation's clustering inputs to
    ``loop/consolidation_inputs.npz`` (:func:`graphs.consolidate.save_inputs`), for
    ``scripts/consolidation_replay.py``.
    """

    def __init__(self, run_dir, protocol, model, augment, score, pool, labeler, cache, memory, accept,
                 gate, threshold, temperature_scaling, representation, cluster_on, keep_fraction,
                 pool_age, max_rounds, seed, consolidate, consolidation_stability=True,
                 pseudo_labels="cluster", score_fit="memory", domain=None,
                 pool_off_domain=True, consolidation_fixed_anchors=True, consolidation_added=0,
                 consolidation_territory=0.75, consolidation_inputs=False,
                 consolidation_k="density") -> None:
        if cluster_on not in ("features", "projected"):
            raise ValueError(f"cluster_on must be 'features' or 'projected', got {cluster_on!r}")
        if pseudo_labels not in ("cluster", "core"):
            raise ValueError(f"pseudo_labels must be 'cluster' or 'core', got {pseudo_labels!r}")
        if pseudo_labels == "core" and (getattr(labeler, "estimate", None) != "density"
                                        or getattr(labeler, "k_new", None) is not None):
            raise ValueError("continual.pseudo_labels = 'core' takes each cluster's dense group, which "
                             "only a labeler that estimates k by density finds: set "
                             "SemiSupervisedKMeans.estimate = 'density' and k_new = None, or "
                             "pseudo_labels = 'cluster'")
        if score_fit not in ("memory", "assigned"):
            raise ValueError(f"score_fit must be 'memory' or 'assigned', got {score_fit!r}")
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        if pool_age < 1 or max_rounds < 1:
            raise ValueError(f"need pool_age >= 1 and max_rounds >= 1, got {pool_age}, {max_rounds}")
        if len(protocol.stream) == 0:
            raise ValueError(f"{protocol.name} has no stream: give the protocol new classes (or phases)")
        if protocol.val is None or len(protocol.val) == 0:
            raise ValueError("the continual loop's promotion gate needs held-out known-class images: "
                             "set make_protocol.val_per_class (the test set is never used for it)")
        self.run_dir, self.protocol, self.make_model = run_dir, protocol, model
        self.augment, self.score, self.labeler, self.cache = augment, score, labeler, cache
        self.accept, self.gate, self.threshold_rule = accept, gate, threshold
        self.temperature_scaling, self.representation = temperature_scaling, representation
        self.cluster_on, self.keep_fraction, self.pseudo_labels = cluster_on, keep_fraction, pseudo_labels
        self.score_fit = score_fit
        if getattr(accept, "max_off_domain", None) is not None and domain is None:
            raise ValueError("ClusterAcceptance.max_off_domain judges clusters by their off-domain samples, "
                             "which needs a domain test: set continual.domain = @InputComplexity()")
        if consolidate and consolidation_fixed_anchors and not hasattr(labeler, "fixed_old"):
            raise ValueError(f"continual.consolidation_fixed_anchors clusters with the labeled classes' "
                             f"centroids fixed, which {type(labeler).__name__} cannot do: set "
                             f"continual.consolidation_fixed_anchors = False, or use SemiSupervisedKMeans")
        if consolidation_added < 0 or consolidation_territory <= 0:
            raise ValueError(f"need continual.consolidation_added >= 0 and consolidation_territory > 0, got "
                             f"{consolidation_added} and {consolidation_territory}")
        if not pool_off_domain and domain is None:
            raise ValueError("continual.pool_off_domain = False keeps off-domain samples out of the pool, "
                             "which needs a domain test: set continual.domain = @InputComplexity()")
        # each stream sample's off-domain flag: the stream is fixed, so it is measured once
        self.off_domain = (None if domain is None
                           else domain.fit(protocol.val.images).outside(protocol.stream.images))
        self.admit = None if pool_off_domain else ~self.off_domain  # which samples may be pooled
        self.pool_age, self.max_rounds, self.seed = pool_age, max_rounds, seed
        self.consolidate, self.consolidation_stability = consolidate, consolidation_stability
        self.consolidation_fixed_anchors = consolidation_fixed_anchors
        self.consolidation_added, self.consolidation_territory = consolidation_added, consolidation_territory
        if consolidation_inputs and consolidate:
            labeler_arguments(labeler)  # refused now, not after the whole stream
        self.consolidation_inputs = consolidation_inputs
        if consolidation_k not in ("outputs", "density"):
            raise ValueError(f"continual.consolidation_k must be 'outputs' or 'density', "
                             f"got {consolidation_k!r}")
        if consolidate and consolidation_k == "density" and (consolidation_added > 0
                                                             or not hasattr(labeler, "estimate")):
            raise ValueError("continual.consolidation_k = 'density' estimates consolidation's clusters "
                             "with SemiSupervisedKMeans and adds an output for every stable group it finds: "
                             "use that labeler and continual.consolidation_added = 0, or "
                             "consolidation_k = 'outputs'")
        self.consolidation_k = consolidation_k
        self.device = idist.device()
        self.state = LoopState(pool, memory)
        self._clock = time.perf_counter()

    @property
    def model(self) -> nn.Module:
        """The current version."""
        return self.state.model

    @model.setter
    def model(self, model: nn.Module) -> None:
        self.state.model = model

    # ------------------------------------------------------------------ the loop as an engine

    def run(self) -> dict:
        p = self.protocol
        log.info(f"[bold]{p.name}[/]: {p.n_old} old classes ({len(p.labeled)} labeled images), "
                 f"{p.n_new} new in {len(p.phases) - 1} phase(s); stream {len(p.stream)} in "
                 f"{len(p.segment_ends)} segment(s), {int((p.stream.targets < 0).sum())} distractors; "
                 f"test {len(p.test)}; device {self.device}")
        saver = CheckedDiskSaver(self.run_dir.file("loop"), require_empty=False)
        # n_saved=2: Ignite removes the oldest file before it writes the new one
        checkpoint = Checkpoint({"loop": self.state}, saver, filename_prefix="state", n_saved=2,
                                global_step_transform=lambda *_: self.state.round, include_self=True)

        def save(engine: Engine) -> None:  # the state first, then the version it names
            now = time.perf_counter()
            self.state.elapsed += now - self._clock
            self._clock = now
            checkpoint(engine)
            self._write_version()
            drop_stage_scope(f"round-{self.state.round}")  # its stages' epochs are not needed now

        # a finished run is left alone by the command line (components.run); here, a loop whose
        # last round was saved writes its metrics and report (again: it may have died writing them)
        resumed = self._resume(saver.dirname, checkpoint)
        def one_round(engine: Engine, r: int) -> None:
            with stage_scope(f"round-{r}"):  # a resumed round finds its stages' epochs
                self._round(engine, r)

        engine = Engine(one_round)
        engine.register_events(*LoopEvents)
        engine.add_event_handler(Events.ITERATION_COMPLETED, save)
        engine.add_event_handler(Events.ITERATION_COMPLETED,
                                 lambda e: e.terminate() if self.state.done else None)
        if not resumed:
            with stage_scope("round-0"):
                self._round_zero()
            save(engine)  # round 0, before the first online step
        if not self.state.done and self.state.round < self.max_rounds:
            engine.run(range(self.state.round + 1, self.max_rounds + 1))
        if not self.state.done:
            self.state.done = True
            log.warning(f"[yellow]stopped after max_rounds = {self.max_rounds} with "
                        f"{len(p.stream) - self.state.position} stream samples left[/]")
        metrics = self._metrics(self.state.elapsed + time.perf_counter() - self._clock)
        self.run_dir.save_operative_config()
        self.run_dir.write_json("metrics.json", metrics)
        from graphs.report import write_continual_report

        write_continual_report(self.run_dir, metrics, self.state, self.protocol)
        return metrics

    def _resume(self, folder: str, checkpoint: Checkpoint) -> bool:
        """Load the last saved loop state and its model, if the run folder has one (and the
        checkpoint handler's own list, so it replaces that file after the next round). A version
        folder newer than the saved state was written by a round that did not finish: it goes,
        and the round runs again."""
        saved = sorted(Path(folder).glob("state_*.pt"), key=lambda f: int(f.stem.split("_")[-1]))
        while saved:  # the newest that reads; a damaged one is set aside (the round runs again)
            try:
                state = load_checkpoint(saved[-1])
                break
            except RunFailure as error:
                log.warning(f"[yellow]{error}; using the one before it[/]")
                damaged = saved.pop()
                damaged.rename(damaged.with_suffix(".damaged"))
        if not saved:
            return False
        Checkpoint.load_objects({"loop": self.state}, state)  # one object: saved flat, beside ...
        checkpoint.load_state_dict(state["checkpointer"])  # ... the handler's own list (include_self)
        self.model = self.make_model(num_classes=len(self.state.classes))
        self.model.load_state_dict(self.state.weights)
        self.model.to(self.device)
        for folder in (self.run_dir.path / "versions").glob("v*"):
            if folder.name[1:].isdigit() and int(folder.name[1:]) > self.state.version:
                shutil.rmtree(folder)
                log.info(f"removed versions/{folder.name}: its round did not finish and runs again")
        self._write_version()  # in case the run stopped between the state and its version
        if isinstance(self.score, Score):  # Mahalanobis, kNN: fit again on what it was fitted on
            self.score.fit(self._score_fit_outputs())
        log.info(f"resuming after round {self.state.round}: stream position {self.state.position}, "
                 f"version v{self.state.version}, {len(self.state.classes)} classes, "
                 f"{len(self.state.pool)} pooled")
        return True

    # ------------------------------------------------------------------ round 0

    def _round_zero(self) -> None:
        p, st = self.protocol, self.state
        manual_seed(self.seed * 1000)
        self.model = self.make_model(num_classes=p.n_old)
        log.info(describe(self.model))
        train(self.model, p.labeled, self.augment, self.device,
              on_first_step=self.run_dir.save_operative_config)
        st.classes = [{"id": c, "name": p.class_names[c], "origin": "labeled", "round": 0,
                       "pseudo_labels": 0, "labeled": int(p.train_counts[c]), "stability": None}
                      for c in range(p.n_old)]
        labeled = encode(self.model, p.labeled, self.augment, self.cache, self.device)
        keys = np.stack([np.full(len(p.labeled), LABELED), np.arange(len(p.labeled))], 1)
        for c in range(p.n_old):
            members = labeled["targets"] == c
            st.memory.add_class(c, keys[members], labeled["features"][members])
        self._fit_threshold()
        accuracy, class_outputs = self._evaluate()
        st.rounds.append({"round": 0, "start": 0, "position": 0, "trigger": None, "pooled": 0,
                          "k_estimated": None, "accepted": [], "rejected": [],
                          "promotion": {"decision": "v0", "why": "trained on the labeled classes"},
                          "version": 0, "classes": len(st.classes), "accuracy": accuracy,
                          "class_outputs": class_outputs,
                          "val_accuracy": self._val_accuracy(self.model)})
        log.info(f"round 0: v0 on {p.n_old} classes, test accuracy {_pct(accuracy['all'])} %")

    # ------------------------------------------------------------------ one round

    def _round(self, engine: Engine, r: int) -> None:
        p, st = self.protocol, self.state
        started = time.perf_counter()
        manual_seed(self.seed * 1000 + r)  # each round reproducible from the saved state alone
        st.pool.new_round(r)
        stream = scaled(self._encode(self.model, p.stream), st.temperature)
        trace: list[tuple[int, int]] = []
        start = st.position
        st.position, _ = online(stream, self.score, st.pool, start=start, trace=trace, admit=self.admit)
        st.trace += [list(t) for t in trace]
        ended = st.position >= len(p.stream)
        record = {"round": r, "start": start, "position": st.position,
                  "trigger": "pool" if st.pool.ready else "end of stream", "pooled": len(st.pool),
                  "k_estimated": None, "accepted": [], "rejected": [], "version": st.version}
        if self.admit is not None:  # read this round and kept out of the pool as off the domain
            record["kept_out"] = int((~self.admit[start:st.position]).sum())
        truth = p.stream.targets.numpy()
        record["pool_truth"] = finite_json(_pool_truth(truth[st.pool.ids], p))
        if len(st.pool):
            engine.fire_event(LoopEvents.POOL_READY)
            self._discover(engine, r, record)
        else:
            record["promotion"] = {"decision": "nothing pooled",
                                   "why": "no stream sample scored above the threshold"}
        if ended and self.consolidate and len(st.classes) > p.n_old:
            before, _ = self._evaluate()  # for the report: what consolidation changed (no decision reads it)
            self._consolidate(engine, r, record)
            record["consolidation"]["accuracy_before"] = before
        aged = st.pool.age_out(self.pool_age)
        record["aged_out"] = len(aged)
        record["classes"] = len(st.classes)
        record["version"] = st.version
        record["accuracy"], record["class_outputs"] = self._evaluate()
        record["seconds"] = time.perf_counter() - started
        st.rounds.append(finite_json(record))
        st.round = r
        st.done = ended
        log.info(f"round {r}: stream {start}→{st.position}, {record['pooled']} pooled, "
                 f"{len(record['accepted'])} accepted / {len(record['rejected'])} rejected, "
                 f"{record['promotion']['decision']}; v{st.version} with {len(st.classes)} classes, "
                 f"test accuracy {_pct(record['accuracy']['all'])} %")

    def _discover(self, engine: Engine, r: int, record: dict) -> None:
        """Cluster the pool, judge the clusters, grow and distill a student, and promote it if
        the gate lets it through; everything it decided goes into ``record``."""
        p, st = self.protocol, self.state
        ids = st.pool.ids
        pool_images = p.stream.subset(ids, f"{p.name}/pool")
        memory = self._memory_images()
        learner = copy.deepcopy(self.model)
        if self.representation is not None:  # the stream seen so far is the unlabeled data
            seen = p.stream.subset(np.arange(st.position), f"{p.name}/seen")
            self.representation(learner, memory, seen, self.augment, self.device)
        on_pool = encode(learner, pool_images, self.augment, self.cache, self.device)
        on_memory = encode(learner, memory, self.augment, self.cache, self.device)
        n_known, y_memory = len(st.classes), on_memory["targets"]
        raw_u, raw_l = on_pool[self.cluster_on], on_memory[self.cluster_on]
        try:
            result = self.labeler(raw_u, raw_l, y_memory, n_known)
        except ValueError as error:
            record["promotion"] = {"decision": "refused", "why": f"clustering refused the pool: {error}"}
            return
        record["k_estimated"] = len(result.centroids) - n_known
        x_u, x_l = self.labeler.geometry(raw_u, raw_l, y_memory, n_known)

        def recluster(index: np.ndarray) -> np.ndarray:  # the whole procedure on a subsample
            return self.labeler(raw_u[index], raw_l, y_memory, n_known).labels

        off_domain = None if self.off_domain is None else self.off_domain[ids]
        if off_domain is not None:
            record["off_domain"] = int(off_domain.sum())
        verdicts = self.accept(result, x_u, x_l, y_memory, n_known, recluster, off_domain=off_domain)
        truth = p.stream.targets.numpy()[ids]
        for v in verdicts:  # what each cluster really held: for the report, never for a decision
            (record["accepted"] if v.accepted else record["rejected"]).append(
                v.as_dict() | {"truth": cluster_truth(truth[result.labels == v.cluster])})
        engine.fire_event(LoopEvents.CLUSTERS_JUDGED)
        # each accepted cluster becomes an output; a merged one joins the cluster it merged into
        outputs = [v for v in verdicts if v.accepted and v.merged_into is None]
        if not outputs:
            record["promotion"] = {"decision": "nothing to learn",
                                   "why": "no cluster was accepted" if verdicts else "no new cluster"}
            return
        new_id = {v.cluster: n_known + i for i, v in enumerate(outputs)}
        new_id |= {v.cluster: new_id[v.merged_into] for v in verdicts if v.merged_into is not None}
        keep = pseudo_label_mask(result, list(new_id), n_known, self.keep_fraction,
                                 core=self.pseudo_labels == "core")
        pseudo_ids = ids[keep]
        pseudo_targets = np.array([new_id[c] for c in result.labels[keep]], dtype=np.int64)
        record["outputs"] = [{"id": n_known + i, "size": int((pseudo_targets == n_known + i).sum()),
                              "truth": cluster_truth(truth[keep][pseudo_targets == n_known + i])}
                             for i in range(len(outputs))]  # for the report only
        # grow the adapted copy by the new outputs and distill into it
        features = on_pool["features"][keep]
        rows = np.stack([features[pseudo_targets == n_known + i].mean(0) for i in range(len(outputs))])
        student = learner.grow(len(outputs), torch.from_numpy(rows).to(self.device))
        names = [c["name"] for c in st.classes] + [f"new-{r}-{i}" for i in range(len(outputs))]
        taught = ImageSet(concat_images([memory.images, take_images(pool_images.images, keep)]),
                          torch.cat([memory.targets, torch.from_numpy(pseudo_targets)]), names,
                          f"{p.name}/memory+pseudo")
        distill(student, self.model, taught, self.augment, self.device)
        before, val = self._val_correct(self.model), self._encode(student, p.val)
        kept, promoted, why = self.gate.select(before, val["logits"], val["targets"], n_known)
        if promoted and not kept:  # every new output did harm: nothing is left to learn
            promoted, why = False, f"{why}; no new output is left, so the current model stays"
        if promoted and len(kept) < len(outputs):  # the student without the outputs that did harm
            student.keep_outputs(list(range(n_known)) + kept)
            renumber = {o: n_known + j for j, o in enumerate(kept)}
            record["dropped_outputs"] = [o for o in record["outputs"] if o["id"] not in renumber]
            record["outputs"] = [o | {"id": renumber[o["id"]]}
                                 for o in record["outputs"] if o["id"] in renumber]
            outputs = [outputs[o - n_known] for o in kept]
            taken = np.isin(pseudo_targets, kept)
            pseudo_ids = pseudo_ids[taken]  # the dropped outputs' samples stay in the pool
            pseudo_targets = np.array([renumber[t] for t in pseudo_targets[taken]], dtype=np.int64)
            names = names[:n_known] + [f"new-{r}-{i}" for i in range(len(kept))]
        # the student the verdict was on (without the dropped outputs), from the logits above
        after = val["logits"][:, list(range(n_known)) + kept].argmax(1) == val["targets"]
        record["promotion"] = {"decision": "promoted" if promoted else "kept", "why": why,
                               "val_before": float(before.mean()), "val_after": float(after.mean())}
        if not promoted:
            engine.fire_event(LoopEvents.KEPT)
            log.warning(f"[yellow]round {r}: {why}[/]")
            return
        engine.fire_event(LoopEvents.PROMOTED)
        self.model = student
        # the whole stream, not the pseudo-labeled subset: the next round reads this cache entry
        student_features = self._encode(student, p.stream)["features"][pseudo_ids]
        for i, v in enumerate(outputs):
            cid = n_known + i
            members = pseudo_targets == cid
            st.classes.append({"id": cid, "name": names[cid], "origin": f"discovered in round {r}",
                               "round": r, "pseudo_labels": int(members.sum()), "labeled": 0,
                               "stability": v.stability, "size": v.size})
            keys = np.stack([np.full(members.sum(), STREAM), pseudo_ids[members]], 1)
            st.memory.add_class(cid, keys, student_features[members])
        st.pool.remove(pseudo_ids)
        st.version += 1
        self._fit_threshold()

    def _consolidate(self, engine: Engine, r: int, record: dict) -> None:
        """At the stream's end, label the discovered classes again with everything seen: the
        stream samples the current model assigns to a discovered class are clustered afresh
        (anchored by the labeled classes, k = as many groups as they hold, or one per
        discovered output: ``consolidation_k``) in a representation learned on the whole
        stream; each new cluster takes the output it shares most samples with (Hungarian), and
        a student distilled on the labeled memory plus these labels replaces the model if the
        gate lets it."""
        p, st = self.protocol, self.state
        n_old, n_all = p.n_old, len(st.classes)
        _, targets = st.memory.items()
        labeled = np.flatnonzero(targets < n_old)
        memory = self._memory_images().subset(labeled, f"{p.name}/labeled-memory")
        names = [c["name"] for c in st.classes]
        a = self.accept
        stability = dict(min_stability=a.min_stability, resamples=a.resamples, fraction=a.fraction,
                         seed=a.seed) if self.consolidation_stability else {}
        student, entry, _ = relabel_discovered(self.model, self.model, memory, p.stream, n_old, names,
                                            self.augment, self.cache, self.device, self.labeler,
                                            self.representation, self.cluster_on, self.keep_fraction,
                                            fixed_anchors=self.consolidation_fixed_anchors,
                                            territory=self.consolidation_territory,
                                            max_added=self.consolidation_added, k_from=self.consolidation_k,
                                            inputs_to=self.run_dir.file("loop/consolidation_inputs.npz")
                                            if self.consolidation_inputs and self.run_dir.writes else None,
                                            **stability)
        record["consolidation"] = entry
        if student is None:
            return
        pseudo_ids, pseudo_targets = entry.pop("ids"), entry.pop("targets")
        kept = entry.get("kept", list(range(n_old, n_all)))
        added = entry.get("added", [])  # the outputs consolidation adds ({name, stability}), after the kept
        truth = p.stream.targets.numpy()  # for the report only
        left_to_labeled(entry, truth)
        entry["outputs"] = [{"id": n_old + j, "was": o, "size": int((pseudo_targets == n_old + j).sum()),
                             "truth": cluster_truth(truth[pseudo_ids][pseudo_targets == n_old + j])}
                            for j, o in enumerate(kept + [None] * len(added))]
        for row, a in zip(entry["outputs"][len(kept):], added, strict=True):  # "was" None: added here
            row |= {"name": a["name"], "stability": a["stability"]}
        entry["dropped_outputs"] = [{"id": o, "name": names[o], "stability": entry["stability"][o]}
                                    for o in range(n_old, n_all) if o not in kept]
        before, after = self._val_correct(self.model), self._val_correct(student)
        promoted, why = self.gate(before, after)
        if promoted and entry["dropped_outputs"]:
            why += "; dropped output(s) " + ", ".join(
                f"{o['id']} ({o['name']}, stability {o['stability']:.2f})" for o in entry["dropped_outputs"])
        entry["decision"], entry["why"] = ("promoted" if promoted else "kept"), why
        if not promoted:
            return
        self.model = student
        if len(kept) < n_all - n_old or added:  # the class table and the memory follow the outputs
            st.classes = st.classes[:n_old] + [st.classes[o] | {"id": n_old + j} for j, o in enumerate(kept)]
            st.classes += [{"id": n_old + len(kept) + j, "name": a["name"], "labeled": 0, "pseudo_labels": 0,
                            "origin": f"discovered in consolidation (round {r})", "round": r,
                            "stability": a["stability"]} for j, a in enumerate(added)]
            st.memory.keep_classes(list(range(n_old)) + kept)
            n_all = len(st.classes)
        student_features = self._encode(student, p.stream)["features"][pseudo_ids]
        for c in range(n_old, n_all):
            members = pseudo_targets == c
            if members.any():
                st.memory.add_class(c, np.stack([np.full(members.sum(), STREAM), pseudo_ids[members]], 1),
                                    student_features[members])
                st.classes[c]["pseudo_labels"] = int(members.sum())
        if record["promotion"]["decision"] != "promoted":  # else it refines the round's version
            st.version += 1
            record["promotion"] = {"decision": "promoted", "why": f"consolidation: {why}",
                                   "round": record.get("promotion")}  # what the round itself decided
        self._fit_threshold()

    # ------------------------------------------------------------------ helpers

    def _encode(self, model: nn.Module, images: ImageSet) -> dict[str, np.ndarray]:
        return encode(model, images, self.augment, self.cache, self.device)

    def _memory_images(self) -> ImageSet:
        """The memory's exemplars as images with their class ids (rows of the store's file when
        the protocol's images are on disk)."""
        keys, targets = self.state.memory.items()
        sources = ((LABELED, self.protocol.labeled), (STREAM, self.protocol.stream))
        where = [np.flatnonzero(keys[:, 0] == source) for source, _ in sources]
        images = concat_images([take_images(pool_of.images, keys[rows, 1])
                                for rows, (_, pool_of) in zip(where, sources, strict=True)])
        in_key_order = np.argsort(np.concatenate(where))  # row i of the result is the memory's key i
        names = [c["name"] for c in self.state.classes]
        return ImageSet(take_images(images, in_key_order), torch.from_numpy(targets), names,
                        f"{self.protocol.name}/memory")

    def _fit_threshold(self) -> None:
        """Temperature and pool threshold for the current model from the held-out known-class
        images alone: the rule sees their scores and nothing of the stream (a rule that needs
        the stream's labels, like ``PoolPrecision``, is refused). Scores that need fitting
        (Mahalanobis, kNN) fit on the memory's exemplars, discovered classes included."""
        st = self.state
        val = self._encode(self.model, self.protocol.val)
        st.temperature = 1.0
        if self.temperature_scaling:
            st.temperature, why = temperature_of(val)
            if why:
                log.warning(f"[yellow]{why}[/]")
        if isinstance(self.score, Score):
            self.score.fit(self._score_fit_outputs())
        known = score_outputs(self.score, scaled(val, st.temperature)).numpy()
        try:
            st.threshold = float(self.threshold_rule(known))
        except ValueError as error:
            raise ValueError(f"the continual loop's threshold rule must work from held-out known-class "
                             f"scores alone ({self.threshold_rule!r}: {error})") from None
        st.pool.threshold = st.threshold

    def _score_fit_outputs(self) -> dict[str, np.ndarray]:
        """What a fitted score (Mahalanobis, kNN) learns the known classes from, in the current
        model's outputs at the current temperature: the memory's exemplars, or with
        ``score_fit="assigned"`` the labeled classes' exemplars plus, for each discovered class,
        the stream samples before the current position that the model assigns to it (its
        exemplars if none). Reads no label of the stream."""
        st, n_old = self.state, self.protocol.n_old
        memory = scaled(self._encode(self.model, self._memory_images()), st.temperature)
        if self.score_fit == "memory" or len(st.classes) == n_old:
            return memory
        # the whole stream's entry is in the cache already (the round scored it); rows before the position
        stream = scaled(self._encode(self.model, self.protocol.stream), st.temperature)
        keys = [k for k in memory if k != "targets" and k in stream]
        seen = {k: np.asarray(stream[k])[:st.position] for k in keys}
        assigned = seen["logits"].argmax(1)
        labeled = memory["targets"] < n_old
        parts = [({k: np.asarray(memory[k])[labeled] for k in keys}, memory["targets"][labeled])]
        for c in range(n_old, len(st.classes)):
            mine = assigned == c
            source, rows = (seen, mine) if mine.any() else (memory, memory["targets"] == c)
            parts.append(({k: np.asarray(source[k])[rows] for k in keys}, np.full(int(rows.sum()), c)))
        return {k: np.concatenate([part[k] for part, _ in parts]) for k in keys} | {
            "targets": np.concatenate([targets for _, targets in parts]).astype(np.int64)}

    def _val_correct(self, model: nn.Module) -> np.ndarray:
        """Which held-out known-class images ``model`` gets right (output c is class c, no remap)."""
        val = self._encode(model, self.protocol.val)
        return val["logits"].argmax(1) == val["targets"]

    def _val_accuracy(self, model: nn.Module) -> float:
        return float(self._val_correct(model).mean())

    def _groups(self, position: int) -> dict[str, list[int]]:
        """Class groups of the accuracy matrix, limited to the phases the stream has reached."""
        p = self.protocol
        starts = [0, *p.segment_ends[:-1]]
        groups = {"old": p.phases[0]}
        seen_new = []
        for phase, ids in enumerate(p.phases[1:], start=1):
            if position > starts[phase - 1] and ids:
                groups[f"phase {phase}"] = ids
                seen_new += ids
        if seen_new:
            groups["new"] = seen_new
        return groups

    def _evaluate(self) -> tuple[dict, list[dict]]:
        """The current model on the test images (for the report; no decision reads them): the
        accuracy of each class group, and where the test images of each class seen so far go
        (the outputs, by name, that take most of them: a class absorbed by another's output
        shows up here round by round)."""
        p, st = self.protocol, self.state
        test = self._encode(self.model, p.test)
        groups = self._groups(st.position)
        predicted = test["logits"].argmax(1)
        accuracy = grouped_accuracy(test["targets"], predicted, groups)
        # beside the clustering accuracy: the labeled classes read by their own outputs
        accuracy["old_own"] = own_output_accuracy(test["targets"], predicted, groups["old"])
        for phase in range(1, len(p.phases)):
            accuracy.setdefault(f"phase {phase}", None)
        accuracy.setdefault("new", None)
        seen = list(dict.fromkeys(c for ids in groups.values() for c in ids))
        names = {c["id"]: c["name"] for c in st.classes}
        class_outputs = [row | {"class": p.class_names[row["class"]],
                                "outputs": [[names[o], share] for o, share in row["outputs"]]}
                         for row in where_classes_go(test["targets"], predicted, seen)]
        return finite_json(accuracy), class_outputs

    def _write_version(self) -> None:
        """``versions/v<n>/`` for the current version, once its state is saved: the model's
        weights, its class table (with the parent version, the round and the decision that made
        it) and its held-out accuracy. Written to a temporary folder and renamed into place; a
        version that exists is finished and never rewritten."""
        st = self.state
        folder = self.run_dir.file("versions") / f"v{st.version}"
        if (folder / "classes.json").exists():
            return
        made = next(r for r in reversed(st.rounds) if r["version"] == st.version and
                    r["promotion"]["decision"] in ("v0", "promoted"))
        tmp = folder.with_name(f".v{st.version}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(self.model.state_dict(), tmp / "model.pt")
        table = {"version": st.version, "parent": st.version - 1 if st.version else None,
                 "round": made["round"], "decision": made["promotion"]["why"], "classes": st.classes}
        (tmp / "classes.json").write_text(json.dumps(finite_json(table), indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(finite_json({
            "val_accuracy": self._val_accuracy(self.model), "threshold": st.threshold,
            "temperature": st.temperature}), indent=2) + "\n")
        tmp.rename(folder)

    # ------------------------------------------------------------------ the run's metrics

    def _metrics(self, seconds: float) -> dict:
        p, st = self.protocol, self.state
        matrix = [r["accuracy"] for r in st.rounds]
        phase_names = [f"phase {i}" for i in range(1, len(p.phases))]
        summary = continual_summary(matrix, ["old", "old_own", *phase_names])
        final = summary["final"]
        discovered = [c for c in st.classes if c["origin"] != "labeled"]
        accepted = [a for r in st.rounds for a in r["accepted"]]
        held = {}  # output id -> what its pseudo-labels really were, the last labels it learned
        for r in st.rounds:
            if r["promotion"]["decision"] == "promoted":
                held |= {o["id"]: o for o in r.get("outputs", [])}
            if r.get("consolidation", {}).get("decision") == "promoted":  # it relabels every output
                held = {o["id"]: o for o in r["consolidation"]["outputs"]}
        promoted = list(held.values())
        matched: dict[int, int] = {}
        for a in promoted:
            matched[a["truth"]["majority"]] = matched.get(a["truth"]["majority"], 0) + 1
        duplicates = sum(n - 1 for c, n in matched.items() if c >= p.n_old) + \
            sum(n for c, n in matched.items() if 0 <= c < p.n_old)
        spurious = sum(1 for a in promoted if a["truth"]["majority"] == -1)
        stream_truth = p.stream.targets.numpy()
        return finite_json({
            "protocol": p.name, "seed": self.seed, "graph": "continual",
            "final": {"all": final["all"], "old": final["old"], "new": final.get("new"),
                      "phases": [final.get(name) for name in phase_names],
                      "old_own": final.get("old_own")},
            "forgetting": {"old": summary["forgetting"]["old"],
                           "phases": [summary["forgetting"][name] for name in phase_names],
                           "old_own": summary["forgetting"]["old_own"]},
            "class_outputs": st.rounds[-1].get("class_outputs", []),  # the final model
            "average_incremental": summary["average_incremental"],
            "matrix": matrix,
            "discovered": len(discovered), "true_new": p.n_new, "duplicates": duplicates,
            "spurious": spurious, "accepted_clusters": len(accepted),
            "classes": st.classes, "version": st.version,
            "rounds": [{k: v for k, v in r.items()} for r in st.rounds],
            "stream": {"length": len(p.stream), "segments": p.segment_ends,
                       "distractors": int((stream_truth < 0).sum())},
            "seconds": seconds,
        })


def _pool_truth(targets: np.ndarray, p: ProtocolData) -> dict:
    """What the pool held when a round discovered (for the report only): the shares of new,
    old and distractor samples, and how many of each true class (``"-1"``: distractors)."""
    if len(targets) == 0:
        return {"new": None, "old": None, "distractors": None, "classes": {}}
    values, counts = np.unique(targets, return_counts=True)
    return {"new": float(np.mean(targets >= p.n_old)),
            "old": float(np.mean((targets >= 0) & (targets < p.n_old))),
            "distractors": float(np.mean(targets < 0)),
            "classes": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}}


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


__all__ = ["ContinualLoop", "LoopEvents", "LoopState", "continual"]
