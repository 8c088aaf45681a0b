"""nox sessions: tests (default), lint, bench. Uses pip in virtualenvs (nox's default)."""

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

# Pinned to the pair installed from the local wheel cache on the project's machines; a plain
# `torch` requirement in pyproject.toml is satisfied by it.
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]


def _install(session: nox.Session, *extra: str) -> None:
    session.install(*TORCH)
    session.install("-e", ".[test]", *extra)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (CPU, tiny data; a few minutes on 2 cores)."""
    _install(session)
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "components", "graphs", "tests", "bench", "scripts", "noxfile.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Side-by-side benchmarks; each prints medians and ratios measured in the same run."""
    _install(session)
    session.run("python", "-m", "bench", *session.posargs)
