"""Check every gin binding before the first stage runs: bad types and out-of-range values.

Without this check a wrong value is found only when the stage that uses it starts, which may be
minutes (or a whole training stage) into a run. :func:`validate_config` runs right after gin has
parsed the files and bindings and raises one ``ValueError`` listing every problem at once, each
naming the binding as written (``distill.epochs = 'abc'``), what is expected and how to fix it.

Two kinds of check:

* **Type**: the bound value against the type hint of the configurable's parameter (``int``,
  ``float``, ``str``, ``bool``, lists and tuples of those, ``X | None``, callables and classes
  bound with ``@name`` / ``@name()``; macros ``%X`` are resolved first). A hint it cannot read or
  judge is skipped, so the check never refuses a value the code would take.
* **Range**: :data:`RULES`, a table of parameter names whose meaning is the same in every
  configurable that has them (``epochs >= 1``, ``lr > 0``, ``rate`` in ``(0, 1)`` ...), checked
  on numbers bound to a parameter of that name in any configurable.

gin has no public API to list the bindings, so this reads ``gin.config._CONFIG`` (``(scope,
selector) -> {parameter: value}``) and ``gin.config._REGISTRY``, as ``components.run --list``
reads the registry.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import math
import re
import types
import typing
from typing import Any

import gin
from gin import config as gin_config

_MISSING = object()  # a macro used but never given a value


@dataclasses.dataclass(frozen=True)
class Rule:
    """A numeric range: ``low``/``high`` bounds (``None``: unbounded), open or closed, and why."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def admits(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return self.high is None or (x < self.high if self.high_open else x <= self.high)

    def text(self) -> str:
        """``>= 1``, ``> 0``, ``in (0, 1]`` ..., as the messages print it."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{_number(self.low)}, {_number(self.high)}{right}"


def _number(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


def at_least(low: float, why: str) -> Rule:
    return Rule(low=low, why=why)


def above(low: float, why: str) -> Rule:
    return Rule(low=low, low_open=True, why=why)


def between(low: float, high: float, why: str, low_open: bool = False, high_open: bool = False) -> Rule:
    return Rule(low, high, low_open, high_open, why)


# Parameter name -> the range its values must lie in. A name is listed only when the rule holds
# for every configurable that has a parameter of that name (`python -m components.run --list`);
# most mirror a check the component itself makes when it is built, which runs too late to help.
RULES: dict[str, Rule] = {
    # training
    "epochs": at_least(1, "at least one pass over the data"),
    "anneal_epochs": at_least(1, "the annealing divides by it"),
    "batch_size": at_least(1, "a batch holds at least one sample"),
    "lr": above(0, "a learning rate of 0 or less does not train"),
    "weight_decay": at_least(0, "torch refuses a negative weight decay"),
    "momentum": at_least(0, "torch refuses a negative momentum"),
    "seed": at_least(0, "numpy and scikit-learn take only non-negative seeds"),
    "split_seed": at_least(0, "numpy takes only non-negative seeds"),
    # losses, scores, heads
    "temperature": above(0, "logits are divided by it"),
    "beta": between(0, 1, "the effective number (1 - beta^n) / (1 - beta) needs it", high_open=True),
    "gamma": at_least(0, "a focusing or norm term, never negative"),
    "drw_start": between(0, 1, "the share of the epochs after which re-weighting starts"),
    # data and protocol
    "ratio": at_least(1, "the imbalance ratio is n_max / n_min"),
    "n_max": at_least(1, "the head class keeps at least one image"),
    "val_per_class": at_least(0, "a number of images"),
    "image_size": at_least(1, "images are resized to image_size x image_size pixels"),
    "views": at_least(0, "a number of augmented views"),
    "test_fraction": between(0, 1, "both the training and the test split need images",
                             low_open=True, high_open=True),
    "distractor_fraction": between(0, 1, "distractors are this share of every stream segment",
                                   high_open=True),
    "pad": at_least(0, "pixels of padding"),
    "degrees": at_least(0, "rotations are drawn from [-degrees, degrees]"),
    "translate": at_least(0, "shifts are drawn from [-translate, translate]"),
    # models
    "in_channels": at_least(1, "the image channels the first convolution takes"),
    "width": at_least(1, "channels of a convolution"),
    "hidden_dim": at_least(1, "a layer width"),
    "out_dim": at_least(1, "a layer width"),
    "num_heads": at_least(1, "a number of heads"),
    # pool, threshold, memory
    "trigger_size": at_least(1, "the pool fires once this many samples arrived"),
    "rate": between(0, 1, "a false-alarm rate is a share of known-class samples",
                    low_open=True, high_open=True),
    "precision": between(0, 1, "a pool precision is a share of the pool", low_open=True),
    "budget": at_least(1, "the memory keeps at least one exemplar"),
    # clustering
    "k": at_least(1, "at least one cluster or neighbour"),
    "k_new": at_least(1, "at least one new class (bind None to estimate it)"),
    "n_new": at_least(1, "a protocol has at least one new class"),
    "k_max": at_least(1, "the largest number of new classes tried"),
    "n_init": at_least(1, "at least one k-means start"),
    "n_iter": at_least(1, "at least one k-means iteration"),
    "overcluster": at_least(1, "a multiple of the number of clusters"),
    "held_out": between(0, 1, "a share of the labeled samples held out to probe k",
                        low_open=True, high_open=True),
    "min_cluster_size": at_least(2, "HDBSCAN needs clusters of two or more samples"),
    "min_samples": at_least(1, "HDBSCAN's neighbourhood size"),
    "min_cluster_share": between(0, 1, "a share of the pool", high_open=True),
    "tol": at_least(0, "a tolerance on the centroid shift"),
    "whiten_ridge": at_least(0, "added to the covariance's diagonal"),
    "nlist": at_least(1, "faiss inverted lists"),
    "nprobe": at_least(1, "faiss lists searched per query"),
    # acceptance and the continual loop
    "fraction": between(0, 1, "each resample keeps this share of the cluster's samples",
                        low_open=True, high_open=True),
    "resamples": at_least(1, "stability is averaged over the resamples"),
    "min_size": at_least(1, "a cluster keeps at least one sample"),
    "min_stability": between(0, 1, "a Jaccard stability is in [0, 1]"),
    "min_separation": at_least(0, "a distance ratio"),
    "max_drop": between(0, 1, "an accuracy drop is a share"),
    "z": at_least(0, "a one-sided z-score"),
    "keep_fraction": between(0, 1, "the share of each cluster kept as pseudo-labels", low_open=True),
    "margin": between(0, 1, "a ratio of squared distances, own centroid to the nearest other",
                      low_open=True),
    "pool_age": at_least(1, "rounds a sample may wait in the pool"),
    "max_rounds": at_least(1, "at least one round"),
    "consolidation_added": at_least(0, "the outputs consolidation may add (0: none)"),
    "consolidation_territory": above(0, "a multiple of the spacing between neighbouring labeled classes"),
}
# Rules by how a name ends, for names the table above does not list.
SUFFIX_RULES: dict[str, Rule] = {
    "_fraction": between(0, 1, "a share"),
    "_weight": at_least(0, "a loss weight"),
}


def rule_for(name: str) -> Rule | None:
    """The range rule for a parameter name, from :data:`RULES` or :data:`SUFFIX_RULES`."""
    if name in RULES:
        return RULES[name]
    return next((rule for end, rule in SUFFIX_RULES.items() if name.endswith(end)), None)


def validate_config() -> None:
    """Check every binding of the parsed gin configuration; raise one ``ValueError`` naming them all.

    Call it after ``gin.parse_config_files_and_bindings`` and before the first stage runs. Only
    what the files and bindings set is checked (defaults are the code's own business).
    """
    problems = []
    for (scope, selector), params in list(gin_config._CONFIG.items()):  # noqa: SLF001
        if selector.startswith("gin."):  # macros and constants: checked where they are used
            continue
        configurable = gin_config._REGISTRY.get(selector)  # noqa: SLF001
        if configurable is None:
            continue
        for param, value in params.items():
            problem = _check_binding(configurable, scope, param, value)
            if problem:
                problems.append(problem)
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise ValueError(f"{count} in the gin configuration, nothing was run:\n"
                         + "\n".join(f"  - {p}" for p in problems))


def _check_binding(configurable, scope: str, param: str, value: Any) -> str | None:
    """The message for one binding, or None when it is fine (or cannot be judged)."""
    binding = _binding_name(configurable, scope, param)
    written = f"{binding} = {_show(value)}"
    resolved = _resolve(value)
    if resolved is _MISSING:
        macro = _first_macro(value)
        return (f"{written}: the macro %{macro} is used but never given a value; "
                f"add `{macro} = ...` to a gin file or to --gin-bindings")
    if resolved is not value:
        written += f" (resolved to {_show(resolved)})"
    if resolved is gin.REQUIRED:
        return None
    hint = _hints(configurable.wrapped).get(param)
    default = _defaults(configurable.wrapped).get(param, inspect.Parameter.empty)
    example = _example(binding, default, hint, param)
    if hint is not None and not (resolved is None and default is None):
        if _fits(resolved, hint) is False:
            return (f"{written}: expects {_describe(hint)}, got {_describe_value(resolved)}; "
                    f"{_how_to_fix(resolved, hint, example)}")
    rule = rule_for(param)
    if rule and _is_number(resolved) and not rule.admits(resolved):
        fix = f"e.g. {example}" if example else f"bind a value {rule.text()}"
        return f"{written}: {param} must be {rule.text()} ({rule.why}); {fix}"
    return None


# --------------------------------------------------------------------------------------------
# names and values as the user wrote them
# --------------------------------------------------------------------------------------------


def _binding_name(configurable, scope: str, param: str) -> str:
    """``distill.epochs``, ``adapt/torch.optim.SGD.lr``: the shortest selector gin accepts for the
    project's own configurables, the registered ``module.name`` for third-party ones (registered
    under another module than their own, as in ``components.external``), which is how the gin
    files and the docs write them."""
    wrapped_module = getattr(configurable.wrapped, "__module__", None)
    if configurable.module and configurable.module != wrapped_module:
        selector = f"{configurable.module}.{configurable.name}"
    else:
        selector = gin_config._REGISTRY.minimal_selector(configurable.selector)  # noqa: SLF001
    return f"{scope}/{selector}.{param}" if scope else f"{selector}.{param}"


def _show(value: Any) -> str:
    return repr(value)  # gin's references print as @name, @name() and %MACRO


def _is_macro(value: Any) -> bool:
    return (isinstance(value, gin_config.ConfigurableReference) and value.evaluate
            and value.configurable.wrapped in (gin_config.macro, gin_config._retrieve_constant))  # noqa: SLF001


def _macro_value(ref: gin_config.ConfigurableReference) -> Any:
    name = "/".join(ref.scopes)
    if ref.configurable.wrapped is gin_config.macro:
        return gin_config._CONFIG.get(ref.config_key, {}).get("value", _MISSING)  # noqa: SLF001
    return gin_config._CONSTANTS.get_match(name, _MISSING)  # noqa: SLF001


def _resolve(value: Any, depth: int = 0) -> Any:
    """``value`` with every macro ``%X`` replaced by what ``X`` is bound to (inside lists too);
    the very same object when there is none, ``_MISSING`` when a macro has no value."""
    if depth > 20:  # a macro bound to itself, however indirectly: leave it to gin
        return value
    if _is_macro(value):
        inner = _macro_value(value)
        return inner if inner is _MISSING else _resolve(inner, depth + 1)
    if isinstance(value, (list, tuple)):
        items = [_resolve(v, depth + 1) for v in value]
        if any(i is _MISSING for i in items):
            return _MISSING
        if all(i is v for i, v in zip(items, value, strict=True)):
            return value
        return type(value)(items)
    if isinstance(value, dict):
        items = {k: _resolve(v, depth + 1) for k, v in value.items()}
        if any(i is _MISSING for i in items.values()):
            return _MISSING
        return value if all(items[k] is v for k, v in value.items()) else items
    return value


def _first_macro(value: Any) -> str:
    """The name of the first macro in ``value`` that has no value (for the message)."""
    if _is_macro(value):
        inner = _macro_value(value)
        return "/".join(value.scopes) if inner is _MISSING else _first_macro(inner)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    return next((_first_macro(v) for v in items if _resolve(v) is _MISSING), "?")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


# --------------------------------------------------------------------------------------------
# type hints
# --------------------------------------------------------------------------------------------


def _target(fn: Any) -> Any:
    """What takes the parameters: the function itself, or a class's ``__init__``."""
    return fn.__init__ if isinstance(fn, type) else fn


@functools.cache
def _hints(fn: Any) -> dict[str, Any]:
    """The parameter type hints of a configurable, resolved. Modules use ``from __future__ import
    annotations``, so hints are strings; a string that cannot be resolved (a name imported only
    for type checkers) is left out, and so is its parameter's check."""
    target = _target(fn)
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 -- one unresolvable hint must not drop the others
        pass
    inner = inspect.unwrap(target)
    namespace = getattr(inner, "__globals__", {})
    out = {}
    for name, hint in getattr(inner, "__annotations__", {}).items():
        if isinstance(hint, str):
            try:
                hint = eval(hint, namespace)  # noqa: S307 -- what typing.get_type_hints does, per name
            except Exception:  # noqa: BLE001
                continue
        out[name] = hint
    return out


@functools.cache
def _defaults(fn: Any) -> dict[str, Any]:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {name: p.default for name, p in parameters.items()}


_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence)
_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)
_SCALARS = (bool, int, float, str)
_PROJECT = ("components", "graphs")  # packages whose classes no code builds from a literal


def _all(results: list[bool | None]) -> bool | None:
    if False in results:
        return False
    return None if None in results else True


def _fits(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` (macros resolved) suits ``hint``: True, False, or None when it cannot
    tell; only False is reported, so every doubtful case answers None."""
    if hint is Any or hint is object or isinstance(hint, (str, typing.TypeVar, typing.ForwardRef)):
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        results = [_fits(value, member) for member in typing.get_args(hint)]
        return True if True in results else None if None in results else False
    if hint is type(None) or hint is None:
        return value is None
    if isinstance(value, gin_config.ConfigurableReference):
        return _reference_fits(value, origin or hint)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    base = origin or hint
    if base is collections.abc.Callable:
        return callable(value)
    if base in _SEQUENCES:
        return _sequence_fits(value, base, typing.get_args(hint))
    if base in _MAPPINGS:
        if not isinstance(value, dict):
            return False
        args = typing.get_args(hint)
        return _all([_fits(v, args[1]) for v in value.values()]) if len(args) == 2 else True
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is str:
        return isinstance(value, str)
    if isinstance(base, type) and base.__module__.split(".")[0] in _PROJECT:
        return isinstance(value, base)  # gin literals are never instances of the project's classes
    return None  # another class: a literal may still be converted by the code (a str to a Path)


def _sequence_fits(value: Any, base: Any, args: tuple) -> bool | None:
    """Lists and tuples are interchangeable in gin files; a string is not a list of strings."""
    if not isinstance(value, (list, tuple)):
        return False
    if not args:
        return True
    if base is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(args) != len(value):
            return False
        return _all([_fits(v, a) for v, a in zip(value, args, strict=True)])
    return _all([_fits(v, args[0]) for v in value])


def _reference_fits(ref: gin_config.ConfigurableReference, base: Any) -> bool | None:
    """``@name`` passes the function or class itself; ``@name()`` what calling it returns, known
    only for a class (an instance of it)."""
    if not isinstance(base, type):
        return None
    wrapped = ref.configurable.wrapped
    try:
        if not ref.evaluate:
            return isinstance(wrapped, base)
        if isinstance(wrapped, type):
            return issubclass(wrapped, base)
    except TypeError:  # a Protocol that is not runtime-checkable
        return None
    return None  # what a function returns is not known before it runs


# --------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------


def _short(hint: Any) -> str:
    """``Callable[..., Module]`` for ``collections.abc.Callable[..., torch.nn.modules.module.Module]``."""
    text = hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint)
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", text).replace("NoneType", "None")


def _describe(hint: Any) -> str:
    """What a hint asks for, in words."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        words = [_describe(member) for member in typing.get_args(hint)]
        return " or ".join(dict.fromkeys(words))
    base = origin or hint
    args = typing.get_args(hint)
    if hint is type(None) or hint is None:
        return "None"
    if base is bool:
        return "True or False"
    if base is int:
        return "an int"
    if base is float:
        return "a number"
    if base is str:
        return "a string in quotes"
    if base is collections.abc.Callable:
        return "a callable (@name)"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if base in _SEQUENCES:
        return f"a list of {_short(args[0])}" if args else "a list"
    if base in _MAPPINGS:
        return "a dict"
    if isinstance(base, type):
        return f"a {_short(base)}"
    return _short(hint)


def _describe_value(value: Any) -> str:
    if isinstance(value, gin_config.ConfigurableReference):
        name = value.configurable.name
        if not value.evaluate:
            return f"@{name} itself (not called)"
        kind = "an instance of" if isinstance(value.configurable.wrapped, type) else "what is returned by"
        return f"{kind} {name}"
    if value is None:
        return "None"
    return f"the {type(value).__name__} {value!r}"


def _how_to_fix(value: Any, hint: Any, example: str | None) -> str:
    """One concrete fix: the usual slips get their own advice, the rest an example binding."""
    wants = {typing.get_origin(m) or m for m in _members(hint)}
    if isinstance(value, gin_config.ConfigurableReference):
        as_class = isinstance(value.configurable.wrapped, type)
        if not value.evaluate and as_class and collections.abc.Callable not in wants:
            return f"add parentheses, {value!r}(), to pass an instance"
        if value.evaluate and collections.abc.Callable in wants:
            return f"drop the parentheses, {repr(value).removesuffix('()')}, to pass it uncalled"
    if isinstance(value, bool) and wants & {int, float}:
        return "True and False are not numbers here; " + (f"e.g. {example}" if example else "bind a number")
    if isinstance(value, str) and wants & {int, float} and _is_numeric_text(value):
        return "write the number without quotes" + (f", e.g. {example}" if example else "")
    if isinstance(value, str) and wants & set(_SEQUENCES):
        return f"write a list, e.g. [{value!r}]"
    if isinstance(value, str) and gin_config._REGISTRY.get_match(value):  # noqa: SLF001
        return f"write @{value} without quotes to bind the configurable of that name"
    if collections.abc.Callable in wants:
        return "bind a function or class with @name, e.g. @energy"
    made_by = [_registered_name(w) for w in wants if _registered_name(w)]
    if made_by:
        return f"bind an instance, e.g. @{made_by[0]}()"
    return f"e.g. {example}" if example else f"bind {_describe(hint)}"


def _registered_name(cls: Any) -> str | None:
    """The gin name of a class registered as a configurable, for an example binding."""
    for _, configurable in gin_config._REGISTRY.items():  # noqa: SLF001
        if configurable.wrapped is cls:
            return configurable.name
    return None


def _is_numeric_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _members(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _example(binding: str, default: Any, hint: Any, param: str) -> str | None:
    """``distill.epochs = 30 (the default)`` when the default is a literal that passes both checks."""
    if default is inspect.Parameter.empty or default is gin.REQUIRED or default is None:
        return None
    if not isinstance(default, (*_SCALARS, list, tuple)):
        return None
    if hint is not None and _fits(default, hint) is False:
        return None
    rule = rule_for(param)
    if rule and _is_number(default) and not rule.admits(default):
        return None
    return f"{binding} = {default!r} (the default)"
