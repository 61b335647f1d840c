"""Prompts and cold start: what the policy is asked, and how it learns to answer at first.

    base.py        Prompt record, PromptSource protocol, hash partition of train/eval
    synthetic.py   seeded verifiable tasks (arith with worked solutions, list ops), slipped demonstrations
    jsonl.py       streamed JSONL prompt datasets (bad lines skipped or fatal, resumable cursor)
    source.py      make_prompt_source(cfg, split): the stream the controller and eval use
    tokenizer.py   character tokenizer (tokenizers library) and the tokenizer.json loading path
    generate.py    a small batched sampling loop (KV-cached) used by eval as the plain option
    sft.py         cold-start SFT (`minirl-async sft`)
    evaluate.py    held-out accuracy (`minirl-async eval`, evaluate(cfg, checkpoint))
"""
