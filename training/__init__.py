"""MELT post-training (spec section 5): turn a trained LoopLM into MELT on a synthetic task.

    task.py      the multi-hop lookup task, deterministic batches and the held-out set
    student.py   the differentiable loop forward: LoopLM, MELT chunk-wise, interpolated K/V
    trainer.py   losses, parameter groups, the teacher / phase 1 / phase 2 training loops
    evaluate.py  accuracy through each model's cached generate, held-out loss, memory
    pipeline.py  teacher, MELT variants, standard model -> checkpoints, table and plot
    config.py    TrainConfig (the Hydra schema of train_melt.py) and its checks
"""
