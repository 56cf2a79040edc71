"""Grading (`answers`, the one grader), benchmark evaluation, forgetting measures and preference pairs built from
graded samples (`preferences`, for DPO/SimPO)."""
