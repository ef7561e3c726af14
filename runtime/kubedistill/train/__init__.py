"""The train stage: the student under FSDP2 (torchrun), off-policy from the teacher cache
or SFT. Entry point: :func:`kubedistill.train.launch.train` (``kubedistill train``).

launch      train(cfg) -> save_path: spawns torchrun, or runs the worker under it
__main__    the worker process (``python -m kubedistill.train --config ...``)
trainer     Trainer: the loop (fit() is the table of contents), evaluation, logging
worker      run_worker: one rank; trainer_class picks off-policy or on-policy
data        prepared samples + teacher states -> step plans -> MicroBatches
student     DistillModule (student body + algorithm as one FSDP root), student init
fsdp        process group, device mesh (FSDP/HSDP), fully_shard, mixed precision
optim       AdamW parameter groups, learning-rate schedules
checkpoint  torch.distributed.checkpoint save/resume with an atomic latest pointer
export      the final HF directory (merged LoRA or adapters) + train_summary.json
lora        peft LoRA wrapping and finalisation
"""
