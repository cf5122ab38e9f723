"""The methods built on the engine: influence scores (aggregated and pairwise), subset selection (greedy
log-det DPP, top-k, random, common), the repair step (Newton, PBRF, the perplexity-bounded step search,
``RepairDelta``) and the trust metrics. Imports nothing from :mod:`trustrepair.app`."""
