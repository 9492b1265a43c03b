"""Benchmarks of tinylora_verl, side by side in one run: ``python -m bench.run [--fast] [--out docs/benchmarks.md]``.

Every benchmark module exposes a ``run(...)`` function that takes its inputs explicitly (a model factory, shapes,
repeats) and returns a :class:`bench.common.Section`: a markdown table plus notes and a machine-readable
``summary``. :mod:`bench.run` feeds them SmolLM2-135M-Instruct and Qwen2.5-7B shapes; ``tests/test_bench.py``
feeds them a tiny seeded model. All randomness comes from explicit ``torch.Generator`` objects.
"""
