"""Training: next-item SFT core, alignment losses, teacher data, Ray Train + DeepSpeed runner.

Importing this package is cheap; Ray and DeepSpeed are imported only by the runner functions.
"""
