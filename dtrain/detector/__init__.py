"""A learned detector of generated images (the seeds' AIImageDetector): a convolutional spatial branch and
an FFT-magnitude branch, fused, trained with Ray Train on real shards against generated shards.

model      the network (`Detector`, `DetectorConfig`) and its version string
encoding   the one encoding both classes pass through before training and scoring
augment    training augmentation through `dtrain bench watermark`'s attacks, both classes alike
data       generated shards (sampling checkpoints, one Ray task each) and loading both classes
train      the Ray Train loop
store      the saved detector (safetensors, with the version in its metadata) and scoring
metrics    AUC, AP, TPR at 1% FPR; the trivial training-free baselines
aeroblade  the reconstruction baseline through a checkpoint's ODE (AEROBLADE-style)
evaluate   the per-generator table, clean and under attacks
errors     DetectorError

See docs/detection.md.
"""
