"""Every tdagg benchmark figure, each beside its ceiling or alternative measured in the same
run, written as ratios to docs/BENCHMARKS.md: ``python -m scripts.bench [--quick]``.

One module per benchmark (forwarder, k6, tcp, memory, storage, accuracy), each returning a
typed result; ``render`` turns them into Markdown; ``__main__`` runs them. Every process
comes from ``common.harness``; the k6 streams are recorded by the run itself.
"""
