"""Training beside the engine: fine-tuning and merging experts (`finetune`) and delta models for
cross-model control (`delta`)."""
