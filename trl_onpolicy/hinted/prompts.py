"""The two prompts of Hinted Decoding, shared by the offline job (`trl_onpolicy.hinted.realign`) and online training
(`trl_onpolicy.trainer.online`).

- The *plain* prompt (`plain_prompt`) is the context the model is trained in: the row's prompt column, or the
  conversation before the last assistant turn of a ``messages`` row (system and earlier turns included), or, when the
  row has neither, the question as a user turn. It is rendered to ids by THE prompt renderer
  (`trl_onpolicy.data.prompts.render_prompt_ids`), exactly as SFTTrainer renders a training prompt.
- The *hinted* prompt (`hinted_messages`, `build_hinted_prompt_ids`) shows the question and the reference solution in
  one user turn (`DEFAULT_HINT_TEMPLATE`, checked by `check_hint_template`); optionally the model first writes a short
  analysis that becomes part of it.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

from trl_onpolicy.data.prompts import is_conversation, last_assistant_index, render_prompt_ids
from trl_onpolicy.utils.generation import generate_ids

DEFAULT_HINT_TEMPLATE = (
    "Here is a problem together with a reference solution.\n\n"
    "Problem:\n{question}\n\n"
    "Reference solution:\n{reference}\n\n"
    "Now solve the problem yourself. Write your own step-by-step reasoning in your own words, as if you were seeing "
    "the problem for the first time, and finish with the final answer in the same form as the reference. Do not "
    "mention or refer to the reference solution."
)
DEFAULT_ANALYSIS_HEADER = "Analysis: "
DEFAULT_SOLUTION_HEADER = "\n\nSolution:\n"
MESSAGES_COLUMN = "messages"  # conversational language-modeling rows (TRL's format)

__all__ = [
    "DEFAULT_HINT_TEMPLATE", "DEFAULT_ANALYSIS_HEADER", "DEFAULT_SOLUTION_HEADER", "check_hint_template",
    "plain_prompt", "conversation_prompt", "hinted_messages", "build_hinted_prompt_ids", "sample_continuations",
]


def check_hint_template(template: str, owner: str = "RealignConfig") -> None:
    """The hinted prompt must be a format string whose only placeholders are ``{question}`` and ``{reference}``
    (both present); a literal brace is written ``{{`` or ``}}``."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ValueError(f"{owner}.hint_template is invalid: {err} (write a literal brace as {{{{ or }}}}).") from None
    unknown = sorted(names - {"question", "reference"})
    if unknown:
        raise ValueError(
            f"{owner}.hint_template is invalid: unknown placeholder(s) {['{' + n + '}' for n in unknown]}; only "
            "{question} and {reference} are filled in (write a literal brace as {{ or }})."
        )
    for key in ("question", "reference"):
        if key not in names:
            raise ValueError(f"{owner}.hint_template must contain {{{key}}} (it is filled with the sample's text).")


def conversation_prompt(messages) -> list[dict] | None:
    """The context of a conversation's last assistant turn: every message before it (system and earlier turns,
    earlier assistant turns included). None when the conversation has no assistant turn after some context."""
    if not is_conversation(messages):
        return None
    last = last_assistant_index(messages)
    if not last:  # no assistant turn, or one with nothing before it
        return None
    return [dict(m) for m in messages[:last]]


def plain_prompt(example: dict, config=None, *, prompt_column: str | None = "prompt", question_column: str = "question",
                 system_prompt: str | None = None):
    """The ordinary training prompt of a sample (the columns come from ``config`` when given):

    1. its ``prompt_column`` (prompt-completion data: text, or chat messages), when present and non-empty;
    2. else, for a conversational language-modeling row (a ``messages`` column), the conversation before its last
       assistant turn (`conversation_prompt`): the context in which SFTTrainer trains that turn;
    3. else a user turn with the question, after a ``system_prompt`` turn when one is set."""
    if config is not None:
        prompt_column, question_column, system_prompt = config.prompt_column, config.question_column, config.system_prompt
    if prompt_column and example.get(prompt_column) not in (None, "", []):
        return example[prompt_column]
    context = conversation_prompt(example.get(MESSAGES_COLUMN))
    if context is not None:
        return context
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": str(example[question_column])}]


def hinted_messages(question: str, reference: str, template: str = DEFAULT_HINT_TEMPLATE, system_prompt: str | None = None,
                    context: Sequence[dict] | None = None):
    """Messages of the hinted ("shadow") prompt: the question and the reference in one user turn.

    With ``context`` (the plain prompt of a conversational row: its system and earlier turns, ending with the user
    turn being answered), the hinted stream keeps that conversation and only replaces its last user turn by the hint,
    so both streams see the same system prompt and history; ``system_prompt`` is added only when the conversation has
    no system turn of its own."""
    hint = {"role": "user", "content": template.format(question=question, reference=reference)}
    earlier = [dict(m) for m in context] if context else []
    if earlier and earlier[-1].get("role") == "user":
        earlier.pop()
    if system_prompt and not any(m.get("role") == "system" for m in earlier):
        earlier.insert(0, {"role": "system", "content": system_prompt})
    return earlier + [hint]


def sample_continuations(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                         temperature: float = 0.0, top_p: float = 1.0, keep_eos: bool = False) -> list[list[int]]:
    """Continuations of token-id prompts (`trl_onpolicy.utils.generation.generate_ids`; greedy when temperature is 0), cut
    after the first EOS (kept with ``keep_eos``)."""
    outs = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    return [ids if keep_eos or not finished else ids[:-1] for ids, finished in outs]


def build_hinted_prompt_ids(model, tokenizer, questions, references, *, template=DEFAULT_HINT_TEMPLATE, system_prompt=None,
                            analysis_max_new_tokens=0, analysis_header=DEFAULT_ANALYSIS_HEADER, analysis_stop="\n\n",
                            solution_header=DEFAULT_SOLUTION_HEADER,
                            chat_template: str | None = None,
                            contexts: Sequence | None = None) -> tuple[list[list[int]], list[str | None]]:
    """Hinted-stream prompt ids for a batch, rendered by `render_prompt_ids` (with ``chat_template`` when given: the
    trainer's); with ``analysis_max_new_tokens > 0`` the model first writes an analysis (greedy, with the current
    weights) after ``analysis_header``, and the hinted prompt continues with it and ``solution_header`` (text of the
    assistant turn, tokenized without special tokens). ``contexts[i]``: the plain prompt of row i when it is a
    conversation (see `hinted_messages`), else None. Returns (ids, analyses)."""
    contexts = list(contexts) if contexts is not None else [None] * len(questions)
    bases = [render_prompt_ids(tokenizer, hinted_messages(q, r, template, system_prompt,
                                                          c if is_conversation(c) else None),
                               chat_template=chat_template)
             for q, r, c in zip(questions, references, contexts)]
    if analysis_max_new_tokens <= 0:
        return bases, [None] * len(bases)

    def text_ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    header = text_ids(analysis_header)
    continuations = sample_continuations(model, tokenizer, [b + header for b in bases], analysis_max_new_tokens)
    ids, analyses = [], []
    for base, cont in zip(bases, continuations):
        text = tokenizer.decode(cont, skip_special_tokens=True)
        if analysis_stop and analysis_stop in text:
            text = text[: text.index(analysis_stop)]
        text = text.strip()
        analyses.append(text)
        ids.append(base + text_ids(analysis_header + text + solution_header))
    return ids, analyses
