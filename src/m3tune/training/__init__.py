"""The `train` step: Matryoshka contrastive fine-tuning of BGE-M3 on Accelerate (DeepSpeed optional).

config    TrainConfig, the step's parameters
data      examples, the seeded no-shared-positive batch sampler, the collator
loss      InfoNCE with in-batch and cross-device negatives, Matryoshka over dims, GradCache
validate  retrieval metrics on the validation split at each Matryoshka dim
loop      the recipe: setup / train / save / cleanup (python -m, accelerate launch, torchrun)
export    the model folder (transformers + sentence-transformers), model card, curves
step      the pipeline step: in-process for one process, a launcher subprocess for more
"""
