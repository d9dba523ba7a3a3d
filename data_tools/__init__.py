"""data_tools: standalone tools that write the episode files train.py and evaluate.py read. Built on memrl (the
episode schema, the sentence splitter, noise placement, the generator); memrl never imports data_tools.

    schema.py       the episode JSONL schema as written; validation is memrl/episodes.py's rules
    runner.py       resumable, crash-safe batch driver: .partial files, failure sidecar, summary
    datasets.py     GSM8K / MATH500 readers -> unsharded Problem records
    rule_shard.py   rule-based sharder (offline, seconds for all of GSM8K)
    prompts.py      the three-step LLM sharding prompts and few-shot examples (data)
    llm_backends.py OpenAI-compatible HTTP backend and local-checkpoint backend (memrl generator)
    llm_shard.py    the three-step LLM sharding: segment -> verify -> extract, validated, retried
    checks.py       checks every sharded episode must pass (numbers kept, question withheld, ...)
    shard.py        CLI: python -m data_tools.shard
    noise.py        WikiText noise variants (memrl/noise.py) written to files, CLI: python -m data_tools.noise
    chunk_docs.py   long-document QA chunking (LongBench / L-Eval), CLI: python -m data_tools.chunk_docs
    report.py       the real-data counts in data_tools/README.md: python -m data_tools.report
"""
