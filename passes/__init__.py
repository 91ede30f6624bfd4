"""attnopt's compiler passes: capture, detect, mask analysis, memory model, planning, rewrite."""
