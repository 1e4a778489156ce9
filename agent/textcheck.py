"""Checks on generated prose: instruction echo, sentence ends, word counts, repetition, language.

Small models paste their own prompt into the answer ("Rewrite only the passage between ...") and
run into the token cap mid-sentence. The apps use these helpers to keep such text out of what they
store, and `bench/quality.py` uses the same ones to measure it, so the benchmark counts exactly what
the apps filter. Pure functions (plus one small streaming filter), no model, no I/O.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

MIN_ECHO_WORDS = 6  # shorter instruction sentences ("Reply with the title only.") are too generic
RUN_ON_WORDS = 40  # a sentence this long without an end is shown anyway (nobody waits for the full stop)
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff]")
_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff]|[^\s\u3400-\u9fff]+")
_QUOTE_MAP = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'", "«": '"', "»": '"', "…": "..."})
# a sentence ends at . ! ? (or their CJK forms), optionally followed by closing quotes/brackets
_END = re.compile(r"[.!?。！？…]+[\"'”’»)\]】」』]*")
_FINAL = re.compile(r"[.!?。！？…][\"'”’»)\]】」』]*$")
_SPLIT = re.compile(r"(?<=[.!?。！？])[\"'”’»)\]】」』]*\s+|(?<=[。！？])|\n+")
_META = re.compile(
    r"^\s*(?:sure[,!.]?\s*)?(?:here(?:'s| is| are)|below is|this is)\b[^\n:]{0,80}:\s*",
    re.IGNORECASE,
)


# contractions written out the same way on both sides of a comparison (a possessive 's is left alone)
_CONTRACTIONS = {
    "won't": "will not",
    "can't": "cannot",
    "n't": " not",
    "'re": " are",
    "'m": " am",
    "'ll": " will",
    "'ve": " have",
    "'d": " would",
    "it's": "it is",
    "that's": "that is",
    "here's": "here is",
    "there's": "there is",
    "what's": "what is",
    "let's": "let us",
}
_CONTRACTION = re.compile(
    r"\b(?:won't|can't|it's|that's|here's|there's|what's|let's)\b|(?<=[a-z])(?:n't|'re|'m|'ll|'ve|'d)\b"
)


def word_count(text: str) -> int:
    """Words, with every CJK character counted as one (Chinese has no spaces)."""
    return len(_WORD.findall(text))


def cjk_share(text: str) -> float:
    """Share of CJK characters among the non-space, non-punctuation characters (0.0 for empty text)."""
    letters = [c for c in text if c.isalnum()]
    if not letters:
        return 0.0
    return sum(1 for c in letters if _CJK.match(c)) / len(letters)


def normalize(text: str) -> str:
    """Lower case, one space between words, curly quotes made straight, contractions written out,
    outer punctuation dropped: "You're a ..." echoes "You are a ..." as much as the exact words do."""
    text = text.translate(_QUOTE_MAP).lower()
    text = _CONTRACTION.sub(lambda m: _CONTRACTIONS[m.group(0)], text)
    text = re.sub(r"\s+", " ", text).strip()
    return text.strip(" .,;:!?\"'()[]-")


def split_sentences(text: str) -> list[str]:
    """Sentences (and lines) of `text`, stripped, empties dropped."""
    return [s.strip() for s in _SPLIT.split(text) if s and s.strip()]


def instruction_sentences(texts: Iterable[str], min_words: int = MIN_ECHO_WORDS) -> list[str]:
    """The normalized sentences of the prompt's instruction texts that are long enough to count as echo."""
    out: list[str] = []
    for text in texts:
        for sentence in split_sentences(text):
            norm = normalize(sentence)
            if word_count(norm) >= min_words and norm not in out:
                out.append(norm)
    return out


def template_sentences(texts: Iterable[str], values: Iterable[str]) -> list[str]:
    """Instruction sentences of rendered prompt texts with the filled-in values (the user's story, the
    plan, the previous page) cut out first: those are context, not instructions."""
    cut = [v.strip() for v in values if isinstance(v, str) and v.strip()]
    out = []
    for text in texts:
        for value in sorted(cut, key=len, reverse=True):
            text = text.replace(value, "\n")
        out.append(text)
    return instruction_sentences(out)


def copies_instructions(text: str, instructions: str, n: int = 3) -> bool:
    """True if `text` repeats `n` consecutive words of the instructions (a title such as
    "Two to Five Words That Name This Story" copied from the field list)."""
    words = normalize(text).split()
    if len(words) < n:
        return False
    haystack = " " + " ".join(normalize(instructions).split()) + " "
    return any(" " + " ".join(words[i : i + n]) + " " in haystack for i in range(len(words) - n + 1))


def find_echo(output: str, sentences: Iterable[str]) -> str | None:
    """The first instruction sentence that `output` contains (case-insensitive), else None."""
    haystack = normalize(output)
    for sentence in sentences:
        if sentence and sentence in haystack:
            return sentence
    return None


def is_echo_sentence(sentence: str, sentences: Iterable[str], min_words: int = MIN_ECHO_WORDS) -> bool:
    """True if `sentence` contains an instruction sentence, or is a long piece of one (a partial echo)."""
    norm = normalize(sentence)
    if not norm:
        return False
    for inst in sentences:
        if inst in norm:
            return True
        if word_count(norm) >= min_words and norm in inst:
            return True
    return False


def strip_meta(text: str) -> str:
    """Drop a leading "Here's the page text with two short sentences:" style preamble."""
    return _META.sub("", text, count=1)


# an assistant talking to the user instead of writing the text ("I'm so happy to help you create ...")
# (narrow on purpose: a character may well say "I'm glad to see you"; dialogue starts with a quote anyway)
_CHATTER = re.compile(
    r"^(?:i(?:'m| am|'d be| would be) (?:so |very |really |more than )?(?:happy|glad|excited|delighted) to "
    r"(?:help|assist) you (?:create|write|make)|i hope you (?:enjoy|like|love) (?:this|the|my|our) "
    r"(?:story|book|tale|page)|let me know if you(?:'d| would)? (?:like|want|need)|as an ai\b)",
    re.IGNORECASE,
)


def _remove_sentences(text: str, drop: list[str]) -> str:
    """`text` without each sentence of `drop` (first occurrence), runs of spaces and blank lines tidied;
    the rest is left exactly as it was."""
    for sentence in drop:
        text = text.replace(sentence, "", 1)
    return re.sub(r"\n\s*\n\s*\n+", "\n\n", re.sub(r"[ \t]{2,}", " ", text)).strip()


def strip_chatter(text: str) -> str:
    """`text` without sentences in which an assistant talks to the user ("I'm so happy to help you ...",
    "I hope you enjoy the story!"); unchanged if nothing else would be left (an odd page beats a failed book)."""
    chatter = [s for s in split_sentences(text) if _CHATTER.match(s.translate(_QUOTE_MAP))]
    if not chatter:
        return text
    return _remove_sentences(text, chatter) or text


def strip_echo(text: str, sentences: list[str]) -> str:
    """`text` without the sentences that echo the instructions; the rest is left exactly as it was."""
    echoes = [s for s in split_sentences(text) if is_echo_sentence(s, sentences)]
    return _remove_sentences(text, echoes) if echoes else text


def ends_at_sentence_end(text: str) -> bool:
    """True if the text's last non-space characters close a sentence."""
    return bool(_FINAL.search(text.rstrip()))


def trim_to_sentence_end(text: str) -> str:
    """`text` cut after its last complete sentence ("" if it has none): for replies cut by max_tokens."""
    last = None
    for match in _END.finditer(text):
        following = text[match.end() : match.end() + 1]
        if not following or following.isspace() or any(c in "。！？" for c in match.group()):
            last = match.end()
    return text[:last] if last is not None else ""


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """Share of the text's word n-grams that occur more than once (0 = no repetition)."""
    words = [w.lower().strip(".,;:!?\"'") for w in _WORD.findall(text)]
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    return sum(c for c in counts.values() if c > 1) / len(grams)


def max_tokens_for_words(
    words: int, *, tokens_per_word: float = 1.6, slack: float = 1.2, minimum: int = 16
) -> int:
    """A max_tokens that lets a reply reach `words` (+20%) but not run far past it.

    About 1.3-1.5 tokens per English word for these tokenizers; the reply is then trimmed to its last
    sentence end, so the cap must leave room for the sentence that crosses the limit.
    """
    return max(minimum, math.ceil(words * slack * tokens_per_word))


class SentenceGate:
    """A streaming filter: passes text on one complete sentence at a time, drops echoed sentences.

    The unfinished tail is held back; `finish(truncated=True)` drops it (the reply hit max_tokens), so a
    stored text never ends mid-sentence and never holds an instruction sentence. With `word_limit`, the
    gate is `full` at the first sentence end at or past the limit; a sentence that would pass it by more
    than 20% is dropped (and the gate is full if the text already has 80% of it): the +-20% band. The
    first sentence is always kept (a one-sentence rewrite of a short selection may run long).
    """

    def __init__(self, sentences: list[str], *, word_limit: int | None = None, meta: bool = True) -> None:
        self.sentences = sentences
        self.word_limit = word_limit
        self.full = False  # the word limit was reached at a sentence end: the caller may stop the model
        self.buffer = ""
        self.text = ""  # everything passed on so far
        self.dropped: list[str] = []
        self._meta = meta
        self._started = False

    def _emit(self, piece: str) -> str:
        body = piece.strip()
        if not body:
            if self.text:
                self.text += piece
                return piece
            return ""
        if self._meta and not self._started:
            stripped = strip_meta(piece)
            if stripped != piece:
                self.dropped.append(piece[: len(piece) - len(stripped)].strip())
                piece = stripped
                if not piece.strip():
                    return ""
        if is_echo_sentence(piece, self.sentences):
            self.dropped.append(body)
            return ""
        if self.full:
            return ""
        if self.word_limit:
            have, add = word_count(self.text), word_count(piece)
            if have and have + add > 1.2 * self.word_limit:  # the first sentence is always kept
                # past the band: stop here if the text is long enough, else skip this one long
                # sentence and let the model go on (a shorter one may land inside the band)
                self.full = have >= 0.8 * self.word_limit
                self.dropped.append(body)
                return ""
            if have + add >= self.word_limit:
                self.full = True
        if not self._started:
            piece = piece.lstrip()
            self._started = True
        self.text += piece
        return piece

    def feed(self, delta: str) -> str:
        """Add a delta; returns the text that may be shown now (complete, clean sentences)."""
        self.buffer += delta
        out = ""
        while True:
            match = re.search(r"(?<=[.!?。！？])[\"'”’»)\]】」』]*(?=\s)|(?<=[。！？])|\n", self.buffer)
            if match is None:
                if word_count(self.buffer) >= RUN_ON_WORDS and self.buffer[-1:].isspace():
                    piece, self.buffer = self.buffer, ""
                    out += self._emit(piece)
                break
            cut = match.end()
            piece, self.buffer = self.buffer[:cut], self.buffer[cut:]
            if not piece.strip() and not self.text:
                continue
            out += self._emit(piece)
        return out

    def finish(self, truncated: bool) -> str:
        """The end of the reply: the held tail, unless the reply was cut (then only its complete sentences)."""
        tail, self.buffer = self.buffer, ""
        if not tail.strip():
            return ""
        # an unfinished last fragment is dropped when the reply was cut, and also when the model simply
        # stopped mid-sentence after complete ones: a stored text ends at a sentence end
        if (truncated or self.text.strip()) and not ends_at_sentence_end(tail):
            whole = trim_to_sentence_end(tail)
            if not whole and self.text.strip():
                self.dropped.append(tail.strip())
                return ""
            if whole:
                self.dropped.append(tail[len(whole) :].strip())
                tail = whole
        return self._emit(tail)
