"""Bad configuration is refused before any work: one ValueError naming every bad binding.

``components.validate.validate_config`` checks the parsed gin bindings against the parameters'
type hints and the range table ``RULES``; these tests parse real gin files with
``components.run.parse_config`` (as the command line does) and check what it says.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import gin
import pytest

from components.run import ConfigError, parse_config
from components.validate import RULES, rule_for, validate_config

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
DISTILL = "gin/distill.gin"
GIN_FILES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "gin").rglob("*.gin"))


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


def problems(*bindings: str, files=(DISTILL,)) -> str:
    """The message validation gives for the files plus ``bindings`` ('' when it is happy):
    ``parse_config`` runs ``validate_config`` and turns its ValueError into a ConfigError."""
    try:
        parse_config(list(files), list(bindings))
    except ConfigError as error:
        return str(error)
    validate_config()  # and called again on a parsed configuration, it stays quiet
    return ""


# --------------------------------------------------------------------------------------------
# every shipped configuration passes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", GIN_FILES)
def test_every_shipped_gin_file_validates(path):
    # Data and compose-after files use %SEED, which the experiment file including them defines.
    assert problems("SEED = 0", files=(path,)) == ""


def _documented_combinations() -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """The compositions docs/configuration.md names: the loop with another dataset, backbone or
    score; every long-tail method; the novelty and discovery add-ons."""
    combos = [
        ((DISTILL,), ("include 'gin/data/fmnist.gin'",)),
        ((DISTILL,), ("include 'gin/models/resnet18_cifar.gin'", "TorchvisionBackbone.in_channels = 1")),
        ((DISTILL,), ("lifecycle.score = @max_softmax", "lifecycle.embedding = 'tsne'")),
        ((DISTILL, "gin/discovery/parametric.gin"), ()),
        (("gin/distill_fmnist.gin", "gin/discovery/parametric.gin"), ()),
        (("gin/longtail/fmnist_lt.gin",), ("RATIO = 10",)),
        (("gin/novelty/digits.gin", "gin/novelty/evidential.gin"), ()),
        (("gin/novelty/fmnist.gin", "gin/novelty/evidential.gin"), ()),
    ]
    combos += [((DISTILL, f), ()) for f in GIN_FILES if f.startswith("gin/scores/")]
    combos += [(("gin/longtail/digits_lt.gin", f), ()) for f in GIN_FILES if "/methods/" in f]
    combos += [(("gin/discovery/digits.gin", f"gin/discovery/{add}.gin"), ())
               for add in ("contrastive", "pretrain", "whitened")]
    return combos


@pytest.mark.parametrize("files, bindings", _documented_combinations(), ids=lambda x: "+".join(x))
def test_every_documented_combination_validates(files, bindings):
    assert problems(*bindings, files=files) == ""


# --------------------------------------------------------------------------------------------
# types
# --------------------------------------------------------------------------------------------


def test_a_string_where_an_int_is_wanted_names_the_binding_and_the_type():
    message = problems("distill.epochs = 'abc'")
    assert message.startswith("1 problem in the gin configuration")
    assert ("distill.epochs = 'abc': expects an int, got the str 'abc'; "
            "e.g. distill.epochs = 80 (the default)") in message


def test_a_number_in_quotes_is_told_to_drop_the_quotes():
    message = problems("train.epochs = '3'")
    assert "train.epochs = '3': expects an int" in message and "without quotes" in message


def test_a_bool_where_an_int_is_wanted_is_refused():
    message = problems("train.batch_size = True")
    assert "train.batch_size = True: expects an int, got the bool True" in message
    assert "True and False are not numbers here" in message


def test_an_int_where_a_float_is_wanted_and_a_tuple_for_a_list_are_fine():
    assert problems("torch.optim.SGD.lr = 1", "BatchAugment.mean = (0.5, 0.5, 0.5)",
                    "make_protocol.new_classes = (7, 8, 9)", "make_protocol.n_max = None") == ""


def test_a_string_for_a_list_and_a_wrong_element_are_refused():
    message = problems("make_protocol.new_superclasses = 'vehicles_1'",
                       "make_protocol.new_classes = [7, 8.5]")
    assert "make_protocol.new_superclasses = 'vehicles_1': expects a list of str" in message
    assert "write a list, e.g. ['vehicles_1']" in message
    assert "make_protocol.new_classes = [7, 8.5]: expects a list of int" in message


def test_references_are_checked_against_what_they_pass():
    message = problems(
        "Network.backbone = @SmallConvNet",  # the class, not an instance
        "train.optimizer = @torch.optim.SGD()",  # an optimizer built with no parameters
        "lifecycle.score = 'energy'",  # a name in quotes, not the function
        "lifecycle.pool = None",
    )
    assert "Network.backbone = @SmallConvNet: expects a Module" in message
    assert "add parentheses, @SmallConvNet(), to pass an instance" in message
    assert "train.optimizer = @torch.optim.SGD(): expects a callable" in message
    assert "drop the parentheses, @torch.optim.SGD, to pass it uncalled" in message
    assert "lifecycle.score = 'energy'" in message and "write @energy without quotes" in message
    assert "lifecycle.pool = None: expects a SamplePool" in message and "@SamplePool()" in message


def test_values_the_code_may_convert_are_not_refused():
    """A hint the check cannot judge (an enum of torchvision weights given by name) is skipped."""
    assert problems("resnet18.weights = 'IMAGENET1K_V1'", "TorchvisionBackbone.weights = 'DEFAULT'",
                    "lifecycle.threshold = @PoolPrecision()", "lifecycle.score = @Mahalanobis()") == ""


def test_macros_are_resolved_before_the_check_and_a_missing_macro_is_named():
    message = problems("EPOCHS = 'many'", "distill.epochs = %EPOCHS", "adapt.epochs = %NOPE")
    assert "distill.epochs = %EPOCHS (resolved to 'many'): expects an int" in message
    assert "adapt.epochs = %NOPE: the macro %NOPE is used but never given a value" in message
    assert problems("EPOCHS = 3", "distill.epochs = %EPOCHS", "train.epochs = %gin.REQUIRED") == ""


@gin.configurable("faults_loose")
def _loose(anything=1, epochs=1, hidden: NoSuchType = 1, width: int = 1):  # noqa: F821
    """Registered for the tests: no hint, a hint that cannot be resolved, and a plain one."""


def test_unhinted_and_unresolvable_parameters_are_skipped_the_rest_still_checked():
    assert "hidden" in inspect.signature(_loose).parameters
    message = problems("faults_loose.anything = 'x'", "faults_loose.hidden = 'x'",
                       "faults_loose.width = 'x'", "faults_loose.epochs = 0")
    assert "faults_loose.anything" not in message and "faults_loose.hidden" not in message
    assert "faults_loose.width = 'x': expects an int" in message
    assert "faults_loose.epochs = 0: epochs must be >= 1" in message  # rules hold for any configurable


# --------------------------------------------------------------------------------------------
# ranges
# --------------------------------------------------------------------------------------------


def test_a_negative_learning_rate_of_a_torch_optimizer_is_a_range_problem():
    message = problems("torch.optim.SGD.lr = -1")
    assert ("torch.optim.SGD.lr = -1: lr must be > 0 (a learning rate of 0 or less does not train); "
            "e.g. torch.optim.SGD.lr = 0.001 (the default)") in message


def test_a_scoped_binding_is_named_with_its_scope():
    assert "adapt/torch.optim.SGD.lr = 0: lr must be > 0" in problems("adapt/torch.optim.SGD.lr = 0")


def test_a_zero_batch_size_and_fractions_outside_their_range_are_refused():
    message = problems("train.batch_size = 0", "lifecycle.keep_fraction = 0", "lifecycle.margin = 1.5",
                       "make_protocol.distractor_fraction = 1", "train.contrastive_weight = -1")
    assert "train.batch_size = 0: batch_size must be >= 1" in message
    assert "lifecycle.keep_fraction = 0: keep_fraction must be in (0, 1]" in message
    assert "lifecycle.margin = 1.5: margin must be in (0, 1]" in message
    assert "make_protocol.distractor_fraction = 1: distractor_fraction must be in [0, 1)" in message
    assert "train.contrastive_weight = -1: contrastive_weight must be >= 0" in message


def test_several_bad_bindings_are_all_named_in_one_error():
    bad = ["distill.epochs = 'abc'", "torch.optim.SGD.lr = -1", "train.batch_size = 0",
           "SamplePool.trigger_size = -1", "make_protocol.ratio = 0.5"]
    message = problems(*bad)
    assert message.startswith("5 problems in the gin configuration, nothing was run:")
    lines = message.splitlines()[1:]
    assert len(lines) == 5
    for binding in bad:
        assert sum(line.startswith(f"  - {binding}:") for line in lines) == 1, binding
    # the wording tests/test_run.py expects from the command line
    assert "trigger_size must be >= 1" in message and "ratio must be >= 1" in message


def test_every_rule_names_a_real_parameter_and_every_default_obeys_its_rule():
    """The table is only true if no configurable's own default breaks it, and a rule for a name
    no configurable has would be dead."""
    from gin import config as gin_config

    names, broken = set(), []
    for selector, configurable in gin_config._REGISTRY.items():  # noqa: SLF001
        if selector.startswith("gin."):
            continue
        try:
            parameters = inspect.signature(configurable.wrapped).parameters
        except (TypeError, ValueError):
            continue
        for name, p in parameters.items():
            names.add(name)
            rule, default = rule_for(name), p.default
            if rule and isinstance(default, (int, float)) and not isinstance(default, bool) \
                    and not rule.admits(default):
                broken.append(f"{selector}.{name} = {default}: not {rule.text()}")
    assert broken == []
    assert set(RULES) - names == set()
