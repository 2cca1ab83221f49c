"""Post-hoc calibration of the confidence head (paper §3.2.1, Sequential Temperature Scaling).

``sts`` fits per-position temperatures and measures ECE/AUROC (numpy only),
``collect`` drafts and verifies on held-out prompts in plain torch to get the
survival outcomes, ``cli`` is ``vllm-dspark calibrate``.
"""
