"""Code the tests share (imported as ``helpers.<module>``): models and data, reference recounts,
synthetic snapshots with planted truth, W&B run files read back, ISN masks."""
