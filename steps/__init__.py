"""Everything that transforms data, in the order the data goes through it.

    prompts/    sources → normalised prompts → decontamination → near-duplicates
    sampling    n on-policy responses per prompt from the policy
    labelers/   one score per response and signal (judges, density ratio, BLEU, ...)
    pairing/    signals → one preference (aggregate) → chosen/rejected pairs → consistency
    publish/    final shards, pictures, card, cost, manifest last; the Hub
    quality/    labelers against human pairs: agreement, fitted weights, the run's gate

Beside the path: ``engines/`` (models behind one protocol) and ``run/`` (where work lives and
who holds it: files, resumable shard jobs, leases, work GC, fault points). A step knows
nothing of resume or placement; ``run.stages`` wraps each step as a resumable shard job.
"""
