"""Training: MELT post-trained from a LoopLM (spec section 5), and every cache design's quality.

On a synthetic task: a LoopLM teacher turned into MELT, and what every looped KV-cache design
costs in quality, zero-shot and post-trained.

    task.py      the multi-hop lookup task, deterministic batches and the held-out set
    products.py  the depth task: products of words in S3 (teacher set `depth`)
    corpus.py    the stdlib text corpus (data/stdlib_files.txt), byte-level windows (set `text`)
    byte_tokenizer.py  the byte-level tokenizer saved with text checkpoints
    settings.py  one interface over the data: batches, held-out set, quality of a model
    scoring.py   teacher-forced scoring through the cache; bits per byte
    student.py   the differentiable loop forwards: LoopLM, MELT chunk-wise, interpolated K/V;
                 first_writes and loopcoder (the policies post-trained like MELT)
    trainer.py   losses, parameter groups, the teacher / phase 1 / phase 2 training loops
    evaluate.py  accuracy through each model's cached generate, held-out loss, memory
    pipeline.py  teacher, MELT variants, standard model -> checkpoints, table and plot
    design_quality.py  per teacher set, every cache design zero-shot and post-trained -> quality.csv,
                 exits, K/V drift (train_melt.py preset=policies)
    config.py    TrainConfig (the Hydra schema of train_melt.py) and its checks

May import: models, bench.measure (probes, K/V drift), bench.rows (atomic files).
"""
