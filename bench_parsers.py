"""lmms-eval's prompts and answer parsers, re-implemented with their quirks (the release LMMS_EVAL_VERSION;
tests/test_lmms_parity.py checks them against that release's own task functions): a reply -> the
answer lmms-eval would score."""

import re

# lmms-eval's generation length (its generation_kwargs max_new_tokens) per benchmark
MAX_NEW_TOKENS = {"mvbench": 16, "videomme": 16, "scienceqa": 16, "pope": 128, "synthetic": 32}
# The lmms-eval release whose prompts and answer parsers this file follows; tests/test_lmms_parity.py checks
# them against that release's own task functions.
LMMS_EVAL_VERSION = "0.7.3"


VIDEOMME_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video and "
                        "the subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")


LETTER_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


POPE_SUFFIX = "\nAnswer the question using a single word or phrase."


# Reasoning blocks lmms-eval's command line cuts out of every reply before a task scores it (--reasoning_tags)
LMMS_EVAL_REASONING_TAGS = (("<think>", "</think>"), ("<analysis>", "</analysis>"))


def lmms_eval_reply(text: str) -> str:
    """The reply as lmms-eval hands it to a task's scorer: its command line removes each complete
    reasoning block (<think>...</think>, then <analysis>...</analysis>; tags are case-sensitive) and,
    where a closing tag is left without an opening one, everything up to the last closing tag; the
    task then strips surrounding whitespace. "<think>A</think> B" -> "B", "A</think>C" -> "C", " \\n" -> ""."""
    for opening, closing in LMMS_EVAL_REASONING_TAGS:
        while opening in text and closing in text:
            start = text.find(opening)
            end = text.find(closing, start)
            if end < 0:  # the only closing tags come before the opening one: left as they are
                break
            text = text[:start] + text[end + len(closing):]
        if closing in text and opening not in text:
            text = text.rpartition(closing)[2]
    return text.strip()


_MVBENCH_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                  "?", "!"]


def mvbench_normalize(text: str) -> str:
    """What MVBench's scorer makes of a reply (and of the gold letter) before comparing the two:
    "X. anything" (X in A-E, any case) -> X; else, with newlines/tabs as spaces, punctuation removed
    or spaced the VQA way, wrapping quotes/parentheses stripped and lowercased, the first standalone
    letter a-e, uppercased ("the answer is a dog" -> A, "(b)" -> B); else that cleaned text ("F" -> "f")."""
    text = text.strip()
    m = re.fullmatch(r"([A-E])\.\s*(.+)", text, flags=re.IGNORECASE)
    if m:
        return m.group(1).upper()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    original = text
    for p in _MVBENCH_PUNCT:
        if (p + " " in original or " " + p in original) or re.search(r"\d,\d", original):
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = re.sub(r"\.(?!\d)", "", text, count=32)  # lmms-eval removes the first 32 periods not before a digit
    for ch in ("'", '"', ")", "("):
        text = text.strip(ch)
    text = text.strip().lower()
    m = re.search(r"\b([a-e])\b", text)
    return m.group(1).upper() if m else text


# The answer phrases Video-MME's extractor looks for (matched in the lowercased reply)
_MCQ_PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
                "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
                "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
                "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは")


# How each way of writing a letter ranks (higher wins; within one form, the later position wins)
_MCQ_FORMS = (("({})", 6), ("{}.", 5), ("{}:", 4), ("{})", 3), ("{} ", 2))


def videomme_extract(text: str, letters: str = "ABCD") -> str:
    """Video-MME's answer letter, as lmms-eval reads it since 0.7.2 (extract_mcq_answer, choices A-D).
    The reply is stripped, then , . ! ? ; : ' " are trimmed from its ends (each in turn, in that order)
    and it is padded with a space on each side. Every capital A-D found is ranked by how it appears:
    the reply starting with it (not followed by a letter) > ending with it (not preceded by one) >
    the first one after an answer phrase ("the answer is", "i choose", ... in any case; even inside a
    word) > "(X)" > "X." > "X:" > "X)" > "X " (the padding counts); among equals the last one wins.
    Only when none of these occurs does a bare capital count (the last). "" when there is none.
    "Answer: C" -> C, "It is B, not A" -> A, "Clearly D" -> D, "Choice B" -> B, "AB" -> B, "b" -> ""."""
    text = text.strip()
    if not text:
        return ""
    for ch in ",.!?;:'\"":
        text = text.strip(ch)
    padded = f" {text} "
    found = []  # (rank, position, letter)
    for letter in letters:
        for form, rank in _MCQ_FORMS:
            at = padded.rfind(form.format(letter))
            if at >= 0:
                found.append((rank, at, letter))
    lowered = padded.lower()  # (its indices are used on the unlowered reply, as lmms-eval does)
    for phrase in _MCQ_PHRASES:
        at = lowered.find(phrase)
        if at >= 0:
            for letter in letters:
                pos = padded.find(letter, at + len(phrase))
                if pos >= 0:
                    found.append((7, pos, letter))
    core = padded.strip()
    if core:
        if core[0] in letters and (len(core) == 1 or not core[1].isalpha()):
            found.append((10, 0, core[0]))
        if core[-1] in letters and (len(core) == 1 or not core[-2].isalpha()):
            found.append((9, len(padded) - 1, core[-1]))
    if not found:
        found = [(0, padded.rfind(letter), letter) for letter in letters if letter in padded]
    return max(found, key=lambda f: f[:2])[2] if found else ""


def scienceqa_letter(text: str) -> str:
    """The option letter ScienceQA's scorer reads in a reply (uppercase; "" for none): the stripped
    reply when it is one letter of either case ("b", " B\\n"), else X from an uppercase "X." at its
    start ("B. foo"); "(B)", "B)", "b." and "The answer is B" read as nothing."""
    text = text.strip()
    low = text.lower()
    if len(low) == 1 and "a" <= low <= "z":
        return low.upper()
    if len(text) >= 2 and text[0].isupper() and text[1] == ".":
        low = text[0].lower()
        if len(low) == 1 and "a" <= low <= "z":
            return low.upper()
    return ""


def pope_answer(text: str) -> str:
    """POPE compares the lowercased, stripped reply with "yes" / "no" exactly ("Yes." is neither), and
    its precision and recall count only those two readings."""
    return text.lower().strip()


def mentioned_values(text: str, values) -> set:
    return {v for v in values if re.search(rf"\b{re.escape(v)}\b", text, flags=re.IGNORECASE)}
