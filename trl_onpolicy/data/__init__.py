"""Datasets: the offline math tasks (chain sums, products, word problems) and SFT dataset loading."""

from .datasets import (ANSWER_FORMATS, FORMAT_INSTRUCTIONS, SPLITS, TASKS, final_answer_line, load_sft_dataset,
                       math_word_problems, question_split)

__all__ = ["ANSWER_FORMATS", "FORMAT_INSTRUCTIONS", "SPLITS", "TASKS", "final_answer_line", "load_sft_dataset",
           "math_word_problems", "question_split"]
