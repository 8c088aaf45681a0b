"""Side-by-side benchmarks of the library against plain PyTorch / torchvision equivalents.

Run them with ``python -m bench`` (or ``nox -s bench``). Each module exposes
``run(repeats: int) -> list[dict]``: rows with ``name``, ``median_s``, ``images_per_s`` or
``ratio``, an optional ``target`` and ``ok``, and ``notes``. Both sides of a comparison are
measured in the same process, interleaved, so that drift cancels out of the ratios.
"""
