"""One recipe over several seeds: mean, spread and per-seed rows of ``dyvm_cifar10.py`` results
(``mambatrim.analysis.seeds``).

The runs must share everything but the seed (model, method options, epochs, lr, batch, test-set size, the
dense model's top-1): a summary over different recipes is refused, naming the field that differs. A result
written before the seed was recorded counts as seed 0.

    python benchmarks/seed_summary.py benchmarks/results/dyvm_cifar10_lr3e-4_prior10.json \
        benchmarks/results/dyvm_cifar10_lr3e-4_prior10_seed{1,2,3}.json --stem dyvm_cifar10_lr3e-4_prior10_seeds

Writes ``STEM.{json,md}`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mambatrim.analysis.seeds import markdown, summarize
from mambatrim.engine.report import write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="dyvm_cifar10.py result JSON files, one per seed")
    parser.add_argument("--stem", required=True)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--max-drop", type=float, default=1.5)
    parser.add_argument("--min-flops-reduction", type=float, default=0.35)
    args = parser.parse_args()
    results = {p: json.loads(Path(p).read_text()) for p in args.results}
    summary = summarize(results, args.max_drop, args.min_flops_reduction)
    text = markdown(summary)
    print(text)
    write_result(args.out, args.stem, summary, text)


if __name__ == "__main__":
    main()
