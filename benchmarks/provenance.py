"""Who/where/when of a benchmark result: recorded in every JSON under benchmarks/results/ (see igengine.bench.provenance)."""

from igengine.bench.provenance import ROOT, git_commit, provenance

__all__ = ["ROOT", "git_commit", "provenance"]
