"""The finetune recipe and what it is built from: the trainer, optimizers, schedules, memory plan, PEFT contract."""
